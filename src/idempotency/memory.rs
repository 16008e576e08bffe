//! In-memory idempotency store: the Redis store's semantics in one process.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::{Claim, ClaimToken, IdempotencyStore, StoreError};
use crate::clock;

/// An [`IdempotencyStore`] kept in this process's memory.
///
/// It has the same semantics as `RedisIdempotencyStore` (feature `redis`):
/// `claim` atomically takes an absent key as *in flight* (holding a fresh [`ClaimToken`]) for
/// the lease; a key whose lease ran out can be claimed again (with a new token); `renew`
/// extends the caller's claim to a fresh lease; `complete` turns it into *done* for the TTL;
/// `release` drops it. All three are fenced: with a token that no longer holds the key they
/// return [`StoreError::LeaseLost`] and leave the new owner's entry untouched.
///
/// Use it for tests, for single-process deployments, or where losing the dedup history on
/// restart is acceptable: nothing is persisted and nothing is shared between processes.
/// Clones share the same entries, so two consumers in one process can share one store.
///
/// # Capacity and eviction
///
/// The store holds at most [`capacity`](Self::capacity) entries
/// ([`DEFAULT_CAPACITY`](Self::DEFAULT_CAPACITY) with [`new`](Self::new)). When a claim needs
/// room it first drops expired entries (lapsed leases and done entries past their TTL), then
/// the done entries that were completed longest ago. Evicting a done entry early only weakens
/// deduplication (a redelivered record would run again), which at-least-once delivery allows.
///
/// A live in-flight claim is **never evicted**: that would let a second worker run the same
/// key concurrently. If every entry is a live claim, the store grows past its capacity rather
/// than refuse or break a claim; it shrinks back to the capacity as those claims complete,
/// are released or expire. Live claims are not bounded by `max_in_flight` alone: besides the
/// records running, a consumer holds the claims of records whose completion, dead letter or
/// retry-tier forward is still being written, and in partition and key order claims fetched
/// ahead for the next records of a lane (up to 32 per claiming record, released once no
/// longer fresh). Each belongs to a record the consumer received and has not settled, so the
/// overshoot stays within its bounds on such records (`max_buffered_records` and twice
/// `max_uncommitted_per_partition` per assigned partition).
///
/// Times are [`tokio::time::Instant`]s, so tests can use paused time. A lease or TTL above
/// one year is taken as one year (delivery rule 17 in the crate docs), so no duration, not
/// even `Duration::MAX`, makes a deadline overflow.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use kourier::{Claim, IdempotencyStore, InMemoryIdempotencyStore};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), kourier::StoreError> {
/// let store = InMemoryIdempotencyStore::with_capacity(10_000);
///
/// let Claim::Acquired(token) = store.claim("order-42", Duration::from_secs(30)).await? else {
///     unreachable!("a fresh key is free");
/// };
/// // ... do the work, then:
/// store.complete("order-42", &token, Duration::from_secs(6 * 3600)).await?;
///
/// assert_eq!(store.claim("order-42", Duration::from_secs(30)).await?, Claim::Done);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct InMemoryIdempotencyStore {
    inner: Arc<Mutex<State>>,
}

impl InMemoryIdempotencyStore {
    /// The capacity used by [`new`](Self::new): 100 000 entries.
    pub const DEFAULT_CAPACITY: usize = 100_000;

    /// An empty store holding up to [`DEFAULT_CAPACITY`](Self::DEFAULT_CAPACITY) entries.
    pub fn new() -> Self {
        Self::with_capacity(Self::DEFAULT_CAPACITY)
    }

    /// An empty store holding up to `capacity` entries (at least 1; `0` is taken as 1).
    ///
    /// See [the type docs](Self#capacity-and-eviction) for what happens when it is full.
    pub fn with_capacity(capacity: usize) -> Self {
        InMemoryIdempotencyStore {
            inner: Arc::new(Mutex::new(State::new(capacity.max(1)))),
        }
    }

    /// The number of entries the store keeps before it evicts.
    pub fn capacity(&self) -> usize {
        self.lock().capacity
    }

    /// The number of live entries (in-flight claims and done keys), expired ones excluded.
    ///
    /// Expired entries are dropped by this call.
    pub fn len(&self) -> usize {
        let mut state = self.lock();
        state.purge_expired(Instant::now());
        state.entries.len()
    }

    /// Whether the store holds no live entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // No code panics while holding the lock; if one ever did, the maps are still
        // consistent between statements, so keep going rather than poison every later call.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Default for InMemoryIdempotencyStore {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for InMemoryIdempotencyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("InMemoryIdempotencyStore")
            .field("capacity", &state.capacity)
            .field("entries", &state.entries.len())
            .field("done", &state.done_by_age.len())
            .finish()
    }
}

#[async_trait]
impl IdempotencyStore for InMemoryIdempotencyStore {
    async fn claim(&self, key: &str, lease: Duration) -> Result<Claim, StoreError> {
        let now = Instant::now();
        let mut state = self.lock();
        match state.live(key, now) {
            Some(Value::Done) => return Ok(Claim::Done),
            Some(Value::InFlight(_)) => return Ok(Claim::Busy),
            None => {}
        }
        state.make_room(now);
        let token = ClaimToken::random();
        state.insert(
            Arc::from(key),
            Value::InFlight(token.clone()),
            clock::after(now, lease),
        );
        Ok(Claim::Acquired(token))
    }

    async fn complete(
        &self,
        key: &str,
        token: &ClaimToken,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut state = self.lock();
        let key = state.held_by(key, token, now)?;
        state.remove(&key);
        state.insert(key, Value::Done, clock::after(now, ttl));
        Ok(())
    }

    async fn release(&self, key: &str, token: &ClaimToken) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut state = self.lock();
        let key = state.held_by(key, token, now)?;
        state.remove(&key);
        Ok(())
    }

    async fn renew(
        &self,
        key: &str,
        token: &ClaimToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut state = self.lock();
        let key = state.held_by(key, token, now)?;
        state.remove(&key);
        state.insert(
            key,
            Value::InFlight(token.clone()),
            clock::after(now, lease),
        );
        Ok(())
    }

    /// One key after another: each call is a few map operations, no round trip to save.
    async fn claim_many(&self, keys: &[&str], lease: Duration) -> Vec<Result<Claim, StoreError>> {
        super::claim_one_by_one(self, keys, lease).await
    }

    async fn complete_many(
        &self,
        claims: &[(&str, &ClaimToken)],
        ttl: Duration,
    ) -> Vec<Result<(), StoreError>> {
        super::complete_one_by_one(self, claims, ttl).await
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Value {
    InFlight(ClaimToken),
    Done,
}

#[derive(Debug)]
struct Entry {
    value: Value,
    expires_at: Instant,
    /// Unique per write: breaks ties in `by_expiry` and orders `done_by_age`.
    seq: u64,
}

#[derive(Debug)]
struct State {
    capacity: usize,
    entries: HashMap<Arc<str>, Entry>,
    /// Every entry, soonest expiry first.
    by_expiry: BTreeMap<(Instant, u64), Arc<str>>,
    /// Done entries, oldest completion first.
    done_by_age: BTreeMap<u64, Arc<str>>,
    next_seq: u64,
}

impl State {
    fn new(capacity: usize) -> Self {
        State {
            capacity,
            entries: HashMap::new(),
            by_expiry: BTreeMap::new(),
            done_by_age: BTreeMap::new(),
            next_seq: 0,
        }
    }

    /// The value of `key` if it has not expired; an expired entry is dropped.
    fn live(&mut self, key: &str, now: Instant) -> Option<&Value> {
        let expired = self.entries.get(key)?.expires_at <= now;
        if expired {
            self.remove(key);
            return None;
        }
        self.entries.get(key).map(|e| &e.value)
    }

    /// The stored key if `token` holds a live claim on it, else `LeaseLost`.
    fn held_by(
        &mut self,
        key: &str,
        token: &ClaimToken,
        now: Instant,
    ) -> Result<Arc<str>, StoreError> {
        match self.entries.get_key_value(key) {
            Some((k, e)) if e.expires_at > now && e.value == Value::InFlight(token.clone()) => {
                Ok(Arc::clone(k))
            }
            _ => Err(StoreError::LeaseLost {
                key: key.to_owned(),
            }),
        }
    }

    fn insert(&mut self, key: Arc<str>, value: Value, expires_at: Instant) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.by_expiry.insert((expires_at, seq), Arc::clone(&key));
        if value == Value::Done {
            self.done_by_age.insert(seq, Arc::clone(&key));
        }
        self.entries.insert(
            key,
            Entry {
                value,
                expires_at,
                seq,
            },
        );
    }

    fn remove(&mut self, key: &str) {
        if let Some(entry) = self.entries.remove(key) {
            self.by_expiry.remove(&(entry.expires_at, entry.seq));
            if entry.value == Value::Done {
                self.done_by_age.remove(&entry.seq);
            }
        }
    }

    fn purge_expired(&mut self, now: Instant) {
        while let Some(entry) = self.by_expiry.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let key = entry.remove();
            self.remove(&key);
        }
    }

    /// Frees one slot for a new entry if the store is full: expired entries first, then the
    /// oldest done entry. Live claims are kept, so the store may grow past its capacity.
    fn make_room(&mut self, now: Instant) {
        if self.entries.len() < self.capacity {
            return;
        }
        self.purge_expired(now);
        while self.entries.len() >= self.capacity {
            let Some((_, key)) = self.done_by_age.pop_first() else {
                tracing::debug!(
                    capacity = self.capacity,
                    live_claims = self.entries.len(),
                    "in-memory idempotency store full of live claims; growing past capacity"
                );
                return;
            };
            tracing::trace!(key = %key, "evicting the oldest done entry from the in-memory idempotency store");
            self.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The call was refused as `LeaseLost` (it changed nothing: see the store contract).
    #[track_caller]
    fn assert_lease_lost<T: std::fmt::Debug>(result: Result<T, StoreError>) {
        let err = result.expect_err("expected LeaseLost");
        assert!(err.is_lease_lost(), "{err:?}");
    }

    const LEASE: Duration = Duration::from_secs(30);
    const TTL: Duration = Duration::from_secs(3600);

    async fn acquire(store: &InMemoryIdempotencyStore, key: &str, lease: Duration) -> ClaimToken {
        match store.claim(key, lease).await.unwrap() {
            Claim::Acquired(token) => token,
            other => panic!("expected Acquired for {key}, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn claim_complete_then_done() {
        let store = InMemoryIdempotencyStore::new();
        let token = acquire(&store, "k", LEASE).await;
        assert_eq!(store.claim("k", LEASE).await.unwrap(), Claim::Busy);
        store.complete("k", &token, TTL).await.unwrap();
        assert_eq!(store.claim("k", LEASE).await.unwrap(), Claim::Done);
        // Completing twice with the same token: the claim is gone.
        assert_lease_lost(store.complete("k", &token, TTL).await);
    }

    #[tokio::test(start_paused = true)]
    async fn release_lets_a_retry_claim_with_a_new_token() {
        let store = InMemoryIdempotencyStore::new();
        let first = acquire(&store, "k", LEASE).await;
        store.release("k", &first).await.unwrap();
        let second = acquire(&store, "k", LEASE).await;
        assert_ne!(first, second);
        assert_lease_lost(store.release("k", &first).await);
        assert_eq!(store.claim("k", LEASE).await.unwrap(), Claim::Busy);
    }

    #[tokio::test(start_paused = true)]
    async fn lease_expiry_fences_the_old_owner() {
        let store = InMemoryIdempotencyStore::new();
        let old = acquire(&store, "k", Duration::from_secs(10)).await;
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(store.claim("k", LEASE).await.unwrap(), Claim::Busy);
        tokio::time::advance(Duration::from_secs(1)).await;
        let new = acquire(&store, "k", LEASE).await;
        assert_ne!(old, new);

        let err = store.complete("k", &old, TTL).await.unwrap_err();
        assert!(matches!(&err, StoreError::LeaseLost { key } if key == "k"));
        assert_lease_lost(store.release("k", &old).await);
        // The new owner still holds it and can complete.
        assert_eq!(store.claim("k", LEASE).await.unwrap(), Claim::Busy);
        store.complete("k", &new, TTL).await.unwrap();
        assert_eq!(store.claim("k", LEASE).await.unwrap(), Claim::Done);
    }

    #[tokio::test(start_paused = true)]
    async fn expired_lease_cannot_be_completed_or_released() {
        let store = InMemoryIdempotencyStore::new();
        let token = acquire(&store, "k", Duration::from_secs(1)).await;
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_lease_lost(store.complete("k", &token, TTL).await);
        assert_lease_lost(store.release("k", &token).await);
        acquire(&store, "k", LEASE).await;
    }

    #[tokio::test(start_paused = true)]
    async fn renew_extends_the_lease_and_is_fenced() {
        let store = InMemoryIdempotencyStore::new();
        let token = acquire(&store, "k", Duration::from_secs(10)).await;
        tokio::time::advance(Duration::from_secs(8)).await;
        store
            .renew("k", &token, Duration::from_secs(10))
            .await
            .unwrap();
        // Past the first lease, within the renewed one.
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(store.claim("k", LEASE).await.unwrap(), Claim::Busy);
        let foreign = ClaimToken::random();
        assert_lease_lost(store.renew("k", &foreign, LEASE).await);
        tokio::time::advance(Duration::from_secs(1)).await;
        // The renewed lease ran out: renewing now is too late and changes nothing.
        assert_lease_lost(store.renew("k", &token, LEASE).await);
        let new = acquire(&store, "k", LEASE).await;
        store.complete("k", &new, TTL).await.unwrap();
        assert_lease_lost(store.renew("k", &new, LEASE).await);
        assert_eq!(store.claim("k", LEASE).await.unwrap(), Claim::Done);
    }

    #[tokio::test(start_paused = true)]
    async fn done_expires_after_its_ttl() {
        let store = InMemoryIdempotencyStore::new();
        let token = acquire(&store, "k", LEASE).await;
        store
            .complete("k", &token, Duration::from_secs(60))
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(store.claim("k", LEASE).await.unwrap(), Claim::Done);
        tokio::time::advance(Duration::from_secs(1)).await;
        acquire(&store, "k", LEASE).await;
    }

    /// `Duration::MAX` neither overflows nor means forever: it is taken as one year.
    #[tokio::test(start_paused = true)]
    async fn huge_durations_do_not_overflow_and_last_a_year() {
        const YEAR: Duration = Duration::from_secs(86_400 * 365);
        let store = InMemoryIdempotencyStore::new();
        let token = acquire(&store, "k", Duration::MAX).await;
        store.complete("k", &token, Duration::MAX).await.unwrap();
        tokio::time::advance(YEAR - Duration::from_secs(1)).await;
        assert_eq!(store.claim("k", LEASE).await.unwrap(), Claim::Done);
        tokio::time::advance(Duration::from_secs(1)).await;
        acquire(&store, "k", LEASE).await;
        acquire(&store, "held", Duration::MAX).await;
        tokio::time::advance(YEAR - Duration::from_secs(1)).await;
        assert_eq!(store.claim("held", LEASE).await.unwrap(), Claim::Busy);
    }

    #[tokio::test(start_paused = true)]
    async fn eviction_drops_expired_entries_first() {
        let store = InMemoryIdempotencyStore::with_capacity(3);
        let a = acquire(&store, "a", LEASE).await;
        store.complete("a", &a, TTL).await.unwrap(); // oldest done, long TTL
        let b = acquire(&store, "b", LEASE).await;
        store
            .complete("b", &b, Duration::from_secs(5))
            .await
            .unwrap();
        acquire(&store, "c", Duration::from_secs(5)).await; // live claim, short lease
        tokio::time::advance(Duration::from_secs(5)).await;

        // Full: "b" (done) and "c" (claim) have expired, so they go and "a" stays.
        acquire(&store, "d", LEASE).await;
        assert_eq!(store.claim("a", LEASE).await.unwrap(), Claim::Done);
        assert_eq!(store.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn eviction_drops_oldest_done_then_grows_over_live_claims() {
        let store = InMemoryIdempotencyStore::with_capacity(3);
        for key in ["a", "b"] {
            let token = acquire(&store, key, LEASE).await;
            store.complete(key, &token, TTL).await.unwrap();
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        let c = acquire(&store, "c", LEASE).await;
        assert_eq!(store.len(), 3);

        // Full, nothing expired: the oldest done entry ("a") makes room.
        let d = acquire(&store, "d", LEASE).await;
        assert_eq!(store.len(), 3);
        assert!(matches!(
            store.claim("a", LEASE).await.unwrap(),
            Claim::Acquired(_)
        )); // evicted "b" (the only done entry left) to make room for "a"'s claim
        assert_eq!(store.len(), 3);

        // Now only live claims (a, c, d): a new claim grows the store instead of evicting.
        let e = acquire(&store, "e", LEASE).await;
        assert_eq!(store.len(), 4);
        for key in ["a", "c", "d", "e"] {
            assert_eq!(store.claim(key, LEASE).await.unwrap(), Claim::Busy, "{key}");
        }
        // Every live claim can still be completed by its owner.
        store.complete("c", &c, TTL).await.unwrap();
        store.complete("d", &d, TTL).await.unwrap();
        store.release("e", &e).await.unwrap();
        assert_eq!(store.len(), 3);
        // Back at capacity: the next claim evicts the oldest done ("c") again.
        acquire(&store, "f", LEASE).await;
        assert_eq!(store.len(), 3);
        assert!(matches!(
            store.claim("c", LEASE).await.unwrap(),
            Claim::Acquired(_)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn clones_share_entries() {
        let one = InMemoryIdempotencyStore::new();
        let two = one.clone();
        let token = acquire(&one, "k", LEASE).await;
        assert_eq!(two.claim("k", LEASE).await.unwrap(), Claim::Busy);
        two.complete("k", &token, TTL).await.unwrap();
        assert_eq!(one.claim("k", LEASE).await.unwrap(), Claim::Done);
        assert!(format!("{one:?}").contains("InMemoryIdempotencyStore"));
    }

    #[test]
    fn zero_capacity_is_one() {
        let store = InMemoryIdempotencyStore::with_capacity(0);
        assert_eq!(store.capacity(), 1);
        assert!(store.is_empty());
    }
}
