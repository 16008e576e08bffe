//! Claims fetched ahead (delivery rules 7 and 15 in the crate docs: leases, applied before a record runs).
//!
//! In partition or key order a lane runs one record at a time, so a claim round trip per
//! record puts the store's latency between every two records of the lane. When a record of
//! an ordered lane has to claim its dedup key, the same batch call also claims the keys of
//! the next records queued in its lane (up to [`CLAIM_AHEAD`]); their answers wait here, and
//! each of those records, when its turn comes, takes its claim instead of asking the store.
//!
//! A claim fetched ahead is a real claim with a lease, held by a record that is not running
//! yet, so it never outlives its use:
//! - it is taken only while **fresh** (sent less than a third of the lease ago, the renewal
//!   period: the attempt's renewal then starts on time) and if no call to the store failed
//!   since it was fetched (in a store outage records stop at their claim, as without
//!   claim-ahead, rather than run on claims whose completion cannot be written); otherwise
//!   it is released and the record claims anew;
//! - a record whose job ends without taking it (a tier record deferred, a poison pill, given
//!   up) releases it at its end;
//! - the sweeper (a task, every [`SWEEP_EVERY`]) releases claims that are no longer fresh and
//!   those of partitions that are draining (revoked or stopping): the records they were for
//!   were dropped from the buffer, and the partition's next owner must not find their keys
//!   busy;
//! - shutdown releases whatever is left ([`AheadClaims::release_all`]), but for claims in use
//!   by a batch (below), which run out with their lease.
//!
//! # Claims lent to a batch
//!
//! A batch handler may run a lane's next records ahead of their turn (see `batch.rs`'s module
//! docs). With a store it is offered only those whose claims wait here for them
//! ([`AheadClaims::lend`]): the contiguous prefix of the lane whose keys were acquired, are
//! fresh and were fetched after the store's last failure (a record whose key is done, busy,
//! unknown or stale ends it, and runs at its turn). Their effects then run under their claims,
//! so those claims must hold for as long as the batch runs: while any message of the records
//! lent lives ([`Lent`], which the messages carry) their entries are **in use**: the sweeper
//! skips them and a task renews them every sixth of the lease, so they are still fresh when
//! their records' turns come (until the partition is lost, as a running record's claim). Each record takes its claim at its turn as any other; a
//! record whose turn is late (its result was not kept) finds it fresh or not, as above.
//!
//! A crash leaves them to expire with their lease, like the claim of a running record. An
//! answer "done" is kept too (the record is a duplicate, skipped at its turn); "busy" and
//! errors are not (the record claims at its turn, as without claim-ahead).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use futures_util::future::join_all;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, warn};

use super::lease::HeldClaim;
use crate::clock::after;
use crate::consumer::stop::Stop;
use crate::guard::store_call;
use crate::idempotency::{ClaimToken, IdempotencyStore};
use crate::record::RawRecord;

/// How many of a lane's next records a claim asks for along with its own key.
pub(crate) const CLAIM_AHEAD: usize = 32;

/// The next records of a lane with their dedup keys, and their partition's stop signals.
pub(crate) type LaneKeys = (Arc<Stop>, Vec<(Arc<RawRecord>, String)>);

/// How often the sweeper looks for claims to release.
const SWEEP_EVERY: Duration = Duration::from_millis(100);

/// What the store answered for a record's key fetched ahead.
#[derive(Debug)]
pub(crate) enum Answer {
    Acquired(ClaimToken),
    Done,
}

#[derive(Debug)]
struct Entry {
    /// Held so the record's address (the map's key) is not reused while the entry lives.
    _record: Arc<RawRecord>,
    key: String,
    answer: Answer,
    /// When the claim, or its last renewal, was sent.
    sent: Instant,
    stop: Arc<Stop>,
    /// Lent to a batch that may be running the record's effect: not swept (see [`Lent`]).
    in_use: bool,
}

/// What a record finds waiting for it.
#[derive(Debug)]
pub(crate) enum Taken {
    /// Its key, claimed for it: it runs without asking the store.
    Held(HeldClaim),
    /// Its key was done already: a duplicate.
    Done,
}

/// See the module docs. One per consumer with idempotency.
pub(crate) struct AheadClaims {
    store: Arc<dyn IdempotencyStore>,
    lease: Duration,
    /// By the record's address (one delivery of one record: a redelivery is another
    /// `RawRecord`, so it never takes the claim fetched for an earlier delivery).
    entries: Mutex<HashMap<usize, Entry, foldhash::fast::RandomState>>,
    /// Entries held, read without the lock (most records find none when claim-ahead is
    /// idle, e.g. in unordered mode).
    len: AtomicUsize,
    sweeper: OnceLock<()>,
    /// When a call to the store last failed (nanoseconds after `base` plus one; 0: never):
    /// a claim fetched before that is not taken (see [`AheadClaims::store_failed`]).
    failed_at: AtomicU64,
    base: Instant,
}

impl std::fmt::Debug for AheadClaims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AheadClaims")
            .field("held", &self.len.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn address(record: &Arc<RawRecord>) -> usize {
    Arc::as_ptr(record) as usize
}

impl AheadClaims {
    pub(crate) fn new(store: Arc<dyn IdempotencyStore>, lease: Duration) -> Self {
        AheadClaims {
            store,
            lease,
            entries: Mutex::default(),
            len: AtomicUsize::new(0),
            sweeper: OnceLock::new(),
            failed_at: AtomicU64::new(0),
            base: Instant::now(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<usize, Entry, foldhash::fast::RandomState>> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How long a claim fetched ahead may wait for its record: a third of the lease.
    fn fresh_for(&self) -> Duration {
        self.lease / 3
    }

    /// A call to the store failed: claims fetched before now are no longer taken (released;
    /// their records claim anew, and wait for the store like any record). During a store
    /// outage records then stop at their claim, as they would without claim-ahead, instead
    /// of running on claims whose completion cannot be written.
    pub(crate) fn store_failed(&self) {
        self.failed_at
            .fetch_max(self.nanos(Instant::now()) + 1, Ordering::AcqRel);
    }

    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Whether the store failed since `sent`.
    fn failed_since(&self, sent: Instant) -> bool {
        self.failed_at.load(Ordering::Acquire) > self.nanos(sent)
    }

    /// Whether a claim fetched ahead waits for `record` (it is not asked for again).
    pub(crate) fn holds(&self, record: &Arc<RawRecord>) -> bool {
        self.len.load(Ordering::Acquire) > 0 && self.lock().contains_key(&address(record))
    }

    /// How many claims fetched ahead wait for their records.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    /// Keeps the answers for records of one lane (`stop` is their partition's); starts the
    /// sweeper on first use.
    pub(crate) fn keep(
        self: &Arc<Self>,
        stop: &Arc<Stop>,
        sent: Instant,
        answers: impl IntoIterator<Item = (Arc<RawRecord>, String, Answer)>,
    ) {
        let mut entries = self.lock();
        for (record, key, answer) in answers {
            let entry = Entry {
                _record: record.clone(),
                key,
                answer,
                sent,
                stop: stop.clone(),
                in_use: false,
            };
            if entries.insert(address(&record), entry).is_none() {
                self.len.fetch_add(1, Ordering::AcqRel);
            }
        }
        drop(entries);
        self.sweeper.get_or_init(|| {
            tokio::spawn(sweep(Arc::downgrade(self)));
        });
    }

    fn remove(&self, record: &Arc<RawRecord>) -> Option<Entry> {
        if self.len.load(Ordering::Acquire) == 0 {
            return None;
        }
        let entry = self.lock().remove(&address(record));
        if entry.is_some() {
            self.len.fetch_sub(1, Ordering::AcqRel);
        }
        entry
    }

    /// The claim fetched ahead for `record` under `key`, if one waits and is fresh; one that
    /// is not fresh is released first (the record then claims anew).
    pub(crate) async fn take(&self, record: &Arc<RawRecord>, key: &str) -> Option<Taken> {
        let entry = self.remove(record)?;
        if entry.key != key {
            // Cannot happen (the key is computed the same way), but a mismatch must not let
            // a record run under another key's claim.
            self.release(entry).await;
            return None;
        }
        match entry.answer {
            Answer::Done => Some(Taken::Done),
            Answer::Acquired(_)
                if entry.sent.elapsed() >= self.fresh_for() || self.failed_since(entry.sent) =>
            {
                self.release(entry).await;
                None
            }
            Answer::Acquired(token) => Some(Taken::Held(HeldClaim::new(token, entry.sent))),
        }
    }

    /// At the end of `record`'s job: releases the claim fetched for it if it never took it.
    pub(crate) async fn forget(&self, record: &Arc<RawRecord>) {
        if let Some(entry) = self.remove(record) {
            self.release(entry).await;
        }
    }

    /// Releases every claim fetched ahead (shutdown), but those in use by a batch that may
    /// still run their effects: they run out with their lease.
    pub(crate) async fn release_all(&self) {
        let all: Vec<Entry> = {
            let mut entries = self.lock();
            let all: Vec<Entry> = entries
                .extract_if(|_, e| !e.in_use)
                .map(|(_, e)| e)
                .collect();
            self.len.fetch_sub(all.len(), Ordering::AcqRel);
            all
        };
        if !all.is_empty() {
            debug!(
                claims = all.len(),
                "releasing the claims fetched ahead for records that did not run"
            );
        }
        for entry in all {
            self.release(entry).await;
        }
    }

    /// Takes out the entries the sweeper releases: not fresh, or of a draining partition.
    fn swept(&self) -> Vec<Entry> {
        if self.len.load(Ordering::Acquire) == 0 {
            return Vec::new();
        }
        let fresh_for = self.fresh_for();
        let swept: Vec<Entry> = self
            .lock()
            .extract_if(|_, e| {
                !e.in_use && (e.stop.drain.is_cancelled() || e.sent.elapsed() >= fresh_for)
            })
            .map(|(_, e)| e)
            .collect();
        self.len.fetch_sub(swept.len(), Ordering::AcqRel);
        swept
    }

    /// Best effort: a claim not released runs out with its lease.
    async fn release(&self, entry: Entry) {
        let Answer::Acquired(token) = entry.answer else {
            return;
        };
        if let Err(e) = store_call("release", self.store.release(&entry.key, &token)).await
            && !e.is_lease_lost()
        {
            warn!(key = entry.key, error = %e, "could not release a claim fetched ahead; it runs out with its lease");
        }
    }
}

/// The claims of a lane's next records lent to a batch (see the module docs): in use until
/// this is dropped (with the last message that carries it), renewed meanwhile.
pub(crate) struct Lent {
    claims: Arc<AheadClaims>,
    /// Held so their addresses are not reused while their entries are in use.
    records: Vec<Arc<RawRecord>>,
    _renewal: DropGuard,
}

impl std::fmt::Debug for Lent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lent")
            .field("records", &self.records.len())
            .finish_non_exhaustive()
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        let mut entries = self.claims.lock();
        for record in &self.records {
            if let Some(entry) = entries.get_mut(&address(record)) {
                entry.in_use = false;
            }
        }
    }
}

impl AheadClaims {
    /// Lends to a batch the claims held for the longest prefix of `next` (a lane's next
    /// records with their delivery keys, in order) whose claims wait here acquired, fresh,
    /// fetched after the store's last failure and not in use already; `None` when the first
    /// has none. The tokens are the prefix's, in order. Their renewal stops when `lost`
    /// fires (the partition is lost: its next owner must be able to claim the keys).
    pub(crate) fn lend<'r>(
        self: &Arc<Self>,
        next: impl IntoIterator<Item = (&'r Arc<RawRecord>, String)>,
        lost: &CancellationToken,
    ) -> Option<(Arc<Lent>, Vec<ClaimToken>)> {
        if self.len.load(Ordering::Acquire) == 0 {
            return None;
        }
        let fresh_for = self.fresh_for();
        let (mut records, mut tokens) = (Vec::new(), Vec::new());
        {
            let mut entries = self.lock();
            for (record, key) in next {
                let Some(entry) = entries.get_mut(&address(record)) else {
                    break;
                };
                let Answer::Acquired(token) = &entry.answer else {
                    break;
                };
                if entry.key != key
                    || entry.in_use
                    || entry.sent.elapsed() >= fresh_for
                    || self.failed_since(entry.sent)
                {
                    break;
                }
                entry.in_use = true;
                tokens.push(token.clone());
                records.push(record.clone());
            }
        }
        if records.is_empty() {
            return None;
        }
        let done = CancellationToken::new();
        let addresses = records.iter().map(address).collect();
        tokio::spawn(renew_lent(
            Arc::downgrade(self),
            addresses,
            lost.clone(),
            done.clone(),
        ));
        let lent = Lent {
            claims: self.clone(),
            records,
            _renewal: done.drop_guard(),
        };
        Some((Arc::new(lent), tokens))
    }

    /// When the oldest claim still in use among `lent` was sent or last renewed.
    fn oldest_in_use(&self, lent: &[usize]) -> Option<Instant> {
        let entries = self.lock();
        lent.iter()
            .filter_map(|a| entries.get(a).filter(|e| e.in_use).map(|e| e.sent))
            .min()
    }

    /// How often a claim lent to a batch is renewed: half the time it stays fresh, so that it
    /// is fresh whenever its record's turn comes.
    fn lent_renewal(&self) -> Duration {
        (self.fresh_for() / 2).max(Duration::from_millis(1))
    }

    /// Renews the claims in use among `lent` that are due (see [`Self::lent_renewal`]);
    /// one the store says is lost is dropped (its record claims anew at its turn).
    async fn renew_due(&self, lent: &[usize]) {
        let period = self.lent_renewal();
        let due: Vec<(usize, String, ClaimToken)> = {
            let entries = self.lock();
            lent.iter()
                .filter_map(|a| {
                    let e = entries.get(a).filter(|e| e.in_use)?;
                    let Answer::Acquired(token) = &e.answer else {
                        return None;
                    };
                    (e.sent.elapsed() >= period).then(|| (*a, e.key.clone(), token.clone()))
                })
                .collect()
        };
        let sent = Instant::now();
        let renewed =
            join_all(due.iter().map(|(_, key, token)| {
                store_call("renew", self.store.renew(key, token, self.lease))
            }))
            .await;
        let mut entries = self.lock();
        for ((a, key, token), renewed) in due.into_iter().zip(renewed) {
            let Some(entry) = entries.get_mut(&a) else {
                continue;
            };
            if !matches!(&entry.answer, Answer::Acquired(t) if *t == token) {
                continue;
            }
            match renewed {
                Ok(()) => entry.sent = sent,
                Err(e) if e.is_lease_lost() => {
                    warn!(
                        key,
                        "a claim lent to a batch was lost; its record claims anew at its turn"
                    );
                    entries.remove(&a);
                    self.len.fetch_sub(1, Ordering::AcqRel);
                }
                Err(e) => {
                    warn!(key, error = %e, "could not renew a claim lent to a batch; retrying at the next tick");
                }
            }
        }
    }
}

/// Renews the claims lent to a batch (see [`Lent`]) until it is dropped (`done`) or the
/// partition is lost.
async fn renew_lent(
    claims: Weak<AheadClaims>,
    lent: Vec<usize>,
    lost: CancellationToken,
    done: CancellationToken,
) {
    // A round whose renewals failed leaves them due: the next waits a period all the same.
    let mut not_before = Instant::now();
    loop {
        let next = {
            let Some(claims) = claims.upgrade() else {
                return;
            };
            let Some(oldest) = claims.oldest_in_use(&lent) else {
                return;
            };
            after(oldest, claims.lent_renewal()).max(not_before)
        };
        tokio::select! {
            () = done.cancelled() => return,
            () = lost.cancelled() => return,
            () = tokio::time::sleep_until(next) => {}
        }
        let Some(claims) = claims.upgrade() else {
            return;
        };
        not_before = after(Instant::now(), claims.lent_renewal());
        claims.renew_due(&lent).await;
    }
}

/// The sweeper: see the module docs. Ends when the consumer is dropped.
async fn sweep(claims: Weak<AheadClaims>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(claims) = claims.upgrade() else {
            return;
        };
        for entry in claims.swept() {
            claims.release(entry).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::InMemoryIdempotencyStore;
    use crate::idempotency::{Claim, IdempotencyStore};

    const LEASE: Duration = Duration::from_secs(30);

    fn record(offset: i64) -> Arc<RawRecord> {
        Arc::new(RawRecord {
            topic: "t".into(),
            partition: 0,
            offset,
            key: None,
            value: None,
            headers: crate::record::Headers::new(),
            timestamp: None,
            log_append_time: false,
        })
    }

    async fn acquired(store: &InMemoryIdempotencyStore, key: &str) -> Answer {
        match store.claim(key, LEASE).await.unwrap() {
            Claim::Acquired(t) => Answer::Acquired(t),
            other => panic!("{other:?}"),
        }
    }

    fn setup() -> (Arc<InMemoryIdempotencyStore>, Arc<AheadClaims>) {
        let store = Arc::new(InMemoryIdempotencyStore::new());
        let claims = Arc::new(AheadClaims::new(store.clone(), LEASE));
        (store, claims)
    }

    #[tokio::test(start_paused = true)]
    async fn a_record_takes_its_fresh_claim_once_and_a_redelivery_never_does() {
        let (store, claims) = setup();
        let (r, again) = (record(1), record(1));
        let answer = acquired(&store, "k").await;
        claims.keep(
            &Arc::default(),
            Instant::now(),
            [(r.clone(), "k".into(), answer)],
        );
        assert!(claims.holds(&r) && !claims.holds(&again));
        assert!(claims.take(&again, "k").await.is_none(), "another delivery");
        let Some(Taken::Held(held)) = claims.take(&r, "k").await else {
            panic!("the claim fetched ahead");
        };
        assert!(claims.take(&r, "k").await.is_none(), "taken once");
        store.complete("k", &held.token, LEASE).await.unwrap();
        assert_eq!(claims.held(), 0);
    }

    /// The stale branch of [`AheadClaims::take`], certainly: the claim is kept already
    /// stale (sent a third of the lease ago) and taken before the runtime runs anything
    /// else, so the sweeper cannot have released it first. `take` releases it itself, and
    /// the record claims anew. One just fresh enough is taken.
    #[tokio::test(start_paused = true)]
    async fn a_stale_claim_is_released_and_the_record_claims_anew() {
        let (store, claims) = setup();
        let (stale, fresh) = (record(1), record(2));
        let now = Instant::now();
        let sent_stale = now
            .checked_sub(LEASE / 3)
            .expect("the clock is past a lease");
        let sent_fresh = now
            .checked_sub(LEASE / 3 - Duration::from_millis(1))
            .expect("the clock is past a lease");
        let a = acquired(&store, "a").await;
        let b = acquired(&store, "b").await;
        claims.keep(
            &Arc::default(),
            sent_stale,
            [(stale.clone(), "a".into(), a)],
        );
        claims.keep(
            &Arc::default(),
            sent_fresh,
            [(fresh.clone(), "b".into(), b)],
        );
        assert_eq!(claims.held(), 2, "the sweeper has not run");
        assert!(claims.take(&stale, "a").await.is_none(), "stale: not taken");
        assert_eq!(claims.held(), 1, "the fresh one waits for its record");
        assert!(
            matches!(store.claim("a", LEASE).await.unwrap(), Claim::Acquired(_)),
            "take released the stale claim"
        );
        assert!(
            matches!(claims.take(&fresh, "b").await, Some(Taken::Held(_))),
            "fresh: taken"
        );
    }

    /// A claim fetched for another key (cannot happen) is released, never used.
    #[tokio::test(start_paused = true)]
    async fn a_claim_under_another_key_is_released_not_taken() {
        let (store, claims) = setup();
        let r = record(1);
        let answer = acquired(&store, "k").await;
        claims.keep(
            &Arc::default(),
            Instant::now(),
            [(r.clone(), "k".into(), answer)],
        );
        assert!(claims.take(&r, "other").await.is_none());
        assert_eq!(claims.held(), 0);
        assert!(
            matches!(store.claim("k", LEASE).await.unwrap(), Claim::Acquired(_)),
            "released"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_sweeper_releases_the_claims_of_a_draining_partition() {
        let (store, claims) = setup();
        let stop = Arc::new(Stop::default());
        let (r, other) = (record(1), record(2));
        let (a, b) = (acquired(&store, "a").await, acquired(&store, "b").await);
        claims.keep(&stop, Instant::now(), [(r.clone(), "a".into(), a)]);
        claims.keep(
            &Arc::default(),
            Instant::now(),
            [(other.clone(), "b".into(), b)],
        );
        stop.drain.cancel();
        tokio::time::sleep(SWEEP_EVERY * 2).await;
        assert!(!claims.holds(&r), "released");
        assert!(matches!(
            store.claim("a", LEASE).await.unwrap(),
            Claim::Acquired(_)
        ));
        assert!(claims.holds(&other), "another partition's claim stays");
        assert_eq!(store.claim("b", LEASE).await.unwrap(), Claim::Busy);
    }

    /// Records 1 and 2 with claims on keys "a" and "b" fetched ahead for them, now.
    async fn two_kept(
        store: &InMemoryIdempotencyStore,
        claims: &Arc<AheadClaims>,
    ) -> (Arc<RawRecord>, Arc<RawRecord>) {
        let (r, other) = (record(1), record(2));
        let (a, b) = (acquired(store, "a").await, acquired(store, "b").await);
        claims.keep(
            &Arc::default(),
            Instant::now(),
            [(r.clone(), "a".into(), a), (other.clone(), "b".into(), b)],
        );
        (r, other)
    }

    #[tokio::test(start_paused = true)]
    async fn a_record_that_ends_without_its_claim_and_shutdown_release_it() {
        let (store, claims) = setup();
        let (r, _other) = two_kept(&store, &claims).await;
        claims.forget(&r).await;
        assert!(matches!(
            store.claim("a", LEASE).await.unwrap(),
            Claim::Acquired(_)
        ));
        assert_eq!(store.claim("b", LEASE).await.unwrap(), Claim::Busy);
        claims.release_all().await;
        assert!(matches!(
            store.claim("b", LEASE).await.unwrap(),
            Claim::Acquired(_)
        ));
        assert_eq!(claims.held(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_claim_fetched_before_a_store_failure_is_not_taken() {
        let (store, claims) = setup();
        let (before, after) = (record(1), record(2));
        let answer = acquired(&store, "a").await;
        claims.keep(
            &Arc::default(),
            Instant::now(),
            [(before.clone(), "a".into(), answer)],
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        claims.store_failed();
        tokio::time::advance(Duration::from_millis(1)).await;
        let answer = acquired(&store, "b").await;
        claims.keep(
            &Arc::default(),
            Instant::now(),
            [(after.clone(), "b".into(), answer)],
        );
        assert!(claims.take(&before, "a").await.is_none(), "fetched before");
        assert!(
            matches!(store.claim("a", LEASE).await.unwrap(), Claim::Acquired(_)),
            "released"
        );
        assert!(
            matches!(claims.take(&after, "b").await, Some(Taken::Held(_))),
            "fetched after"
        );
    }

    /// A store failure at the very instant a claim was fetched (the paused clock does not
    /// move) counts as after it: the claim is not taken. Also at the claims' first instant,
    /// where "failed at 0 ns" must not read as "never failed".
    #[tokio::test(start_paused = true)]
    async fn a_store_failure_at_the_instant_of_the_fetch_counts() {
        let (store, claims) = setup();
        let r = record(1);
        let answer = acquired(&store, "a").await;
        claims.keep(
            &Arc::default(),
            claims.base,
            [(r.clone(), "a".into(), answer)],
        );
        claims.store_failed();
        assert!(claims.take(&r, "a").await.is_none());
    }

    /// Shutdown leaves a claim lent to a batch (its effect may be running) to its lease; once
    /// the batch let it go, its record takes it at its turn.
    #[tokio::test(start_paused = true)]
    async fn shutdown_leaves_a_claim_lent_to_a_batch_and_its_record_takes_it_after() {
        let (store, claims) = setup();
        let (lent, _other) = two_kept(&store, &claims).await;
        let (in_batch, tokens) = claims
            .lend([(&lent, "a".to_owned())], &CancellationToken::new())
            .expect("held for it");
        assert_eq!(tokens.len(), 1);
        claims.release_all().await;
        assert_eq!(
            store.claim("a", LEASE).await.unwrap(),
            Claim::Busy,
            "in use"
        );
        assert!(
            matches!(store.claim("b", LEASE).await.unwrap(), Claim::Acquired(_)),
            "released"
        );
        drop(in_batch);
        assert!(matches!(
            claims.take(&lent, "a").await,
            Some(Taken::Held(_))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_done_answer_makes_the_record_a_duplicate() {
        let (_store, claims) = setup();
        let r = record(1);
        claims.keep(
            &Arc::default(),
            Instant::now(),
            [(r.clone(), "k".into(), Answer::Done)],
        );
        assert!(matches!(claims.take(&r, "k").await, Some(Taken::Done)));
    }
}
