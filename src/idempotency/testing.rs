//! Testing with idempotency stores (feature `testing`): a conformance suite for
//! [`IdempotencyStore`] implementations, and [`HookedStore`], a store with faults, delays or
//! counters added.
//!
//! # The conformance suite
//!
//! [`run_conformance`] drives a store through every case of the contract written on the
//! [`idempotency`](super) module — fresh keys, busy and done keys, expiry of leases and of
//! done keys, fencing of stale and foreign tokens, release and complete in every order,
//! concurrent claims, renewal of a held claim with its fencing, and the batch calls
//! (`claim_many`, `complete_many`) answering each key as the single-key call would — and
//! reports each case.
//! Both stores kourier ships pass it (see `tests/idempotency.rs`). A store whose
//! [`IdempotencyStore::renew`] answers [`StoreError::Unsupported`] (it cannot renew) fails
//! the `renew-*` cases: the consumer cannot keep its claims alive while handlers run.
//!
//! It runs in real time with short leases (a few hundred milliseconds; about 5 s in all)
//! and writes only keys under one fresh random prefix (`kourier-conformance:<random>:`), so
//! it can run against a shared development server. Keys it leaves behind expire within a
//! minute.
//!
//! Run it from a test of your own (with `kourier = { version = "...", features = ["testing"] }`
//! in `[dev-dependencies]`), under `#[tokio::test]`:
//!
//! ```
//! use std::sync::Arc;
//! use kourier::idempotency::testing::{run_conformance, CASES};
//!
//! // #[tokio::test]
//! async fn my_store_keeps_the_idempotency_contract() {
//!     # let my_store = kourier::InMemoryIdempotencyStore::new();
//!     // let my_store = MyStore::connect("...").await?;
//!     let report = run_conformance(Arc::new(my_store))
//!         .await
//!         .unwrap_or_else(|e| panic!("{e}")); // the report: each case, ok or why it failed
//!     assert_eq!(report.passed(), CASES.len());
//! }
//! ```
//!
//! # A store that misbehaves on purpose
//!
//! [`HookedStore`] forwards every call to a store of yours (the in-memory one, say) through a
//! [`StoreHook`] that sees each [`StoreCall`] before the store does — and may make it wait,
//! fail or panic — and each [`StoreAnswer`] after, which it may record or change: a store
//! that is down, slow, cannot renew or loses an answer, for testing a handler or a consumer
//! against it, without writing a whole store.

mod hook;

pub use self::hook::{CannotRenew, HookedStore, StoreAnswer, StoreCall, StoreHook};

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use super::{Claim, ClaimToken, IdempotencyStore, StoreError};

/// The lease the expiry cases use.
const SHORT: Duration = Duration::from_millis(300);
/// Comfortably past [`SHORT`].
const PAST_SHORT: Duration = Duration::from_millis(600);
/// The lease of claims that must stay live for the whole case.
const LEASE: Duration = Duration::from_secs(60);
/// The TTL of done keys that must stay done for the whole case.
const TTL: Duration = Duration::from_secs(60);
/// Claimers racing for one key in the concurrency case.
const RACERS: usize = 16;

/// The cases [`run_conformance`] checks, in the order it runs them.
pub const CASES: &[&str] = &[
    "fresh-key-is-acquired",
    "tokens-are-unique",
    "held-key-is-busy",
    "complete-makes-done",
    "done-expires-after-ttl",
    "release-frees-the-key",
    "expired-lease-can-be-claimed-again",
    "complete-after-expired-unclaimed-lease-is-lease-lost",
    "release-after-expired-unclaimed-lease-is-lease-lost",
    "complete-after-expired-and-reclaimed-is-lease-lost",
    "release-after-expired-and-reclaimed-is-lease-lost",
    "release-after-done-is-lease-lost",
    "complete-twice-is-lease-lost",
    "release-twice-is-lease-lost",
    "complete-after-release-is-lease-lost",
    "foreign-token-is-lease-lost",
    "absent-key-is-lease-lost",
    "concurrent-claims-have-one-winner",
    "keys-are-opaque-and-independent",
    "renew-extends-the-lease",
    "renew-with-a-foreign-token-is-lease-lost",
    "renew-after-expired-lease-is-lease-lost",
    "renew-after-release-is-lease-lost",
    "renew-after-done-is-lease-lost",
    "claim-many-answers-each-key-as-claim-would",
    "complete-many-fences-each-key-as-complete-would",
];

/// The result of one case.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CaseResult {
    /// The case's name (one of [`CASES`]).
    pub name: &'static str,
    /// `None` when the store behaved as the contract says; else what it did instead.
    pub failure: Option<String>,
}

/// What [`run_conformance`] found: one [`CaseResult`] per case.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Report {
    /// The store, as its `Debug` output.
    pub store: String,
    /// Every case, in the order of [`CASES`].
    pub cases: Vec<CaseResult>,
}

impl Report {
    /// How many cases passed.
    pub fn passed(&self) -> usize {
        self.cases.iter().filter(|c| c.failure.is_none()).count()
    }

    /// The cases that failed.
    pub fn failures(&self) -> impl Iterator<Item = &CaseResult> {
        self.cases.iter().filter(|c| c.failure.is_some())
    }

    /// Whether every case passed.
    pub fn is_conformant(&self) -> bool {
        self.failures().next().is_none()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "idempotency store conformance: {}/{} cases passed ({})",
            self.passed(),
            self.cases.len(),
            self.store
        )?;
        for case in &self.cases {
            match &case.failure {
                None => writeln!(f, "  ok    {}", case.name)?,
                Some(why) => writeln!(f, "  FAIL  {}: {why}", case.name)?,
            }
        }
        Ok(())
    }
}

/// A store that broke the contract in at least one case; holds the whole [`Report`].
#[derive(Debug, Clone)]
pub struct ConformanceError {
    /// Every case, failed or not.
    pub report: Report,
}

impl fmt::Display for ConformanceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.report)
    }
}

impl std::error::Error for ConformanceError {}

/// Runs every case of [`CASES`] against `store` and reports each.
///
/// Needs a Tokio runtime with the time driver (`#[tokio::test]` has one). Takes about 5 s:
/// the expiry cases wait out short leases in real time.
///
/// # Errors
/// A [`ConformanceError`] (with the full report) when any case failed — including a store
/// error where the contract expects an answer.
pub async fn run_conformance(store: Arc<dyn IdempotencyStore>) -> Result<Report, ConformanceError> {
    let prefix = format!("kourier-conformance:{}:", ClaimToken::random());
    let mut cases = Vec::with_capacity(CASES.len());
    for &name in CASES {
        let key = format!("{prefix}{name}");
        let failure = run_case(name, &*store, &key).await.err();
        cases.push(CaseResult { name, failure });
    }
    let report = Report {
        store: format!("{store:?}"),
        cases,
    };
    if report.is_conformant() {
        Ok(report)
    } else {
        Err(ConformanceError { report })
    }
}

type CaseResultOf = Result<(), String>;

fn run_case<'a>(
    name: &'static str,
    s: &'a dyn IdempotencyStore,
    k: &'a str,
) -> Pin<Box<dyn Future<Output = CaseResultOf> + Send + 'a>> {
    Box::pin(async move {
        if let Some(result) = cases_1(name, s, k).await {
            return result;
        }
        if let Some(result) = cases_2(name, s, k).await {
            return result;
        }
        if let Some(result) = cases_3(name, s, k).await {
            return result;
        }
        if let Some(result) = cases_4(name, s, k).await {
            return result;
        }
        if let Some(result) = cases_5(name, s, k).await {
            return result;
        }
        if let Some(result) = cases_6(name, s, k).await {
            return result;
        }
        if let Some(result) = cases_7(name, s, k).await {
            return result;
        }
        if let Some(result) = cases_8(name, s, k).await {
            return result;
        }
        Err(format!("unknown case {name}"))
    })
}

/// What a group of cases answers for a case it does not hold.
const NOT_IN_GROUP: &str = "\0not in this group";

/// `None` when `result` is [`NOT_IN_GROUP`]'s.
fn in_group(result: CaseResultOf) -> Option<CaseResultOf> {
    match result {
        Err(e) if e == NOT_IN_GROUP => None,
        other => Some(other),
    }
}

/// Cases `fresh-key-is-acquired` to `expired-lease-can-be-claimed-again`, in the contract's order.
async fn cases_1(name: &str, s: &dyn IdempotencyStore, k: &str) -> Option<CaseResultOf> {
    in_group(
        async {
            match name {
                "fresh-key-is-acquired" => {
                    acquire(s, k, LEASE).await?;
                }
                "tokens-are-unique" => {
                    let a = acquire(s, k, LEASE).await?;
                    s.release(k, &a).await.map_err(|e| call("release", &e))?;
                    let b = acquire(s, k, LEASE).await?;
                    let c = acquire(s, &format!("{k}:other"), LEASE).await?;
                    if a == b || a == c || b == c {
                        return Err(format!("tokens repeat: {a}, {b}, {c}"));
                    }
                }
                "held-key-is-busy" => {
                    acquire(s, k, LEASE).await?;
                    expect_claim(s, k, &Claim::Busy, "a second claim of a held key").await?;
                    expect_claim(s, k, &Claim::Busy, "a third claim of a held key").await?;
                }
                "complete-makes-done" => {
                    let t = acquire(s, k, LEASE).await?;
                    s.complete(k, &t, TTL)
                        .await
                        .map_err(|e| call("complete", &e))?;
                    expect_claim(s, k, &Claim::Done, "a claim after complete").await?;
                }
                "done-expires-after-ttl" => {
                    let t = acquire(s, k, LEASE).await?;
                    s.complete(k, &t, SHORT)
                        .await
                        .map_err(|e| call("complete", &e))?;
                    expect_claim(s, k, &Claim::Done, "a claim within the TTL").await?;
                    tokio::time::sleep(PAST_SHORT).await;
                    acquire(s, k, LEASE)
                        .await
                        .map_err(|e| format!("after the TTL: {e}"))?;
                }
                "release-frees-the-key" => {
                    let t = acquire(s, k, LEASE).await?;
                    s.release(k, &t).await.map_err(|e| call("release", &e))?;
                    acquire(s, k, LEASE)
                        .await
                        .map_err(|e| format!("after release: {e}"))?;
                }
                "expired-lease-can-be-claimed-again" => {
                    acquire(s, k, SHORT).await?;
                    expect_claim(s, k, &Claim::Busy, "a claim within the lease").await?;
                    tokio::time::sleep(PAST_SHORT).await;
                    acquire(s, k, LEASE)
                        .await
                        .map_err(|e| format!("after the lease: {e}"))?;
                }
                _ => return Err(NOT_IN_GROUP.to_owned()),
            }
            Ok(())
        }
        .await,
    )
}

/// Cases `complete-after-expired-unclaimed-lease-is-lease-lost` to `release-after-expired-and-reclaimed-is-lease-lost`, in the contract's order.
async fn cases_2(name: &str, s: &dyn IdempotencyStore, k: &str) -> Option<CaseResultOf> {
    in_group(
        async {
            match name {
                "complete-after-expired-unclaimed-lease-is-lease-lost" => {
                    let t = acquire(s, k, SHORT).await?;
                    tokio::time::sleep(PAST_SHORT).await;
                    lease_lost(
                        s.complete(k, &t, TTL).await,
                        "complete after the lease ran out",
                    )?;
                    acquire(s, k, LEASE).await.map_err(|e| {
                        format!("the late complete must not mark the key done: {e}")
                    })?;
                }
                "release-after-expired-unclaimed-lease-is-lease-lost" => {
                    let t = acquire(s, k, SHORT).await?;
                    tokio::time::sleep(PAST_SHORT).await;
                    lease_lost(s.release(k, &t).await, "release after the lease ran out")?;
                    acquire(s, k, LEASE).await?;
                }
                "complete-after-expired-and-reclaimed-is-lease-lost" => {
                    let old = acquire(s, k, SHORT).await?;
                    tokio::time::sleep(PAST_SHORT).await;
                    let new = acquire(s, k, LEASE).await?;
                    lease_lost(
                        s.complete(k, &old, TTL).await,
                        "complete with the old token",
                    )?;
                    expect_claim(
                        s,
                        k,
                        &Claim::Busy,
                        "the new owner's claim must be untouched",
                    )
                    .await?;
                    s.complete(k, &new, TTL)
                        .await
                        .map_err(|e| call("complete (new owner)", &e))?;
                    expect_claim(s, k, &Claim::Done, "after the new owner completed").await?;
                }
                "release-after-expired-and-reclaimed-is-lease-lost" => {
                    let old = acquire(s, k, SHORT).await?;
                    tokio::time::sleep(PAST_SHORT).await;
                    let new = acquire(s, k, LEASE).await?;
                    lease_lost(s.release(k, &old).await, "release with the old token")?;
                    expect_claim(
                        s,
                        k,
                        &Claim::Busy,
                        "the new owner's claim must be untouched",
                    )
                    .await?;
                    s.release(k, &new)
                        .await
                        .map_err(|e| call("release (new owner)", &e))?;
                }
                _ => return Err(NOT_IN_GROUP.to_owned()),
            }
            Ok(())
        }
        .await,
    )
}

/// Cases `release-after-done-is-lease-lost` to `absent-key-is-lease-lost`, in the contract's order.
async fn cases_3(name: &str, s: &dyn IdempotencyStore, k: &str) -> Option<CaseResultOf> {
    in_group(
        async {
            match name {
                "release-after-done-is-lease-lost" => {
                    let t = acquire(s, k, LEASE).await?;
                    s.complete(k, &t, TTL)
                        .await
                        .map_err(|e| call("complete", &e))?;
                    lease_lost(s.release(k, &t).await, "release after complete")?;
                    expect_claim(s, k, &Claim::Done, "the key must stay done").await?;
                }
                "complete-twice-is-lease-lost" => {
                    let t = acquire(s, k, LEASE).await?;
                    s.complete(k, &t, TTL)
                        .await
                        .map_err(|e| call("complete", &e))?;
                    lease_lost(s.complete(k, &t, TTL).await, "a second complete")?;
                    expect_claim(s, k, &Claim::Done, "the key must stay done").await?;
                }
                "release-twice-is-lease-lost" => {
                    let t = acquire(s, k, LEASE).await?;
                    s.release(k, &t).await.map_err(|e| call("release", &e))?;
                    lease_lost(s.release(k, &t).await, "a second release")?;
                }
                "complete-after-release-is-lease-lost" => {
                    let t = acquire(s, k, LEASE).await?;
                    s.release(k, &t).await.map_err(|e| call("release", &e))?;
                    lease_lost(s.complete(k, &t, TTL).await, "complete after release")?;
                    acquire(s, k, LEASE).await.map_err(|e| {
                        format!("the late complete must not mark the key done: {e}")
                    })?;
                }
                "foreign-token-is-lease-lost" => {
                    let held = acquire(s, k, LEASE).await?;
                    let forged = ClaimToken::random();
                    lease_lost(
                        s.complete(k, &forged, TTL).await,
                        "complete with a foreign token",
                    )?;
                    lease_lost(s.release(k, &forged).await, "release with a foreign token")?;
                    expect_claim(s, k, &Claim::Busy, "the holder's claim must be untouched")
                        .await?;
                    s.complete(k, &held, TTL)
                        .await
                        .map_err(|e| call("complete (holder)", &e))?;
                }
                "absent-key-is-lease-lost" => {
                    let forged = ClaimToken::random();
                    lease_lost(
                        s.complete(k, &forged, TTL).await,
                        "complete of an absent key",
                    )?;
                    lease_lost(s.release(k, &forged).await, "release of an absent key")?;
                    acquire(s, k, LEASE)
                        .await
                        .map_err(|e| format!("neither call may create the key: {e}"))?;
                }
                _ => return Err(NOT_IN_GROUP.to_owned()),
            }
            Ok(())
        }
        .await,
    )
}

/// Cases `claim-many-answers-each-key-as-claim-would` to `claim-many-answers-each-key-as-claim-would`, in the contract's order.
async fn cases_4(name: &str, s: &dyn IdempotencyStore, k: &str) -> Option<CaseResultOf> {
    in_group(
        async {
            match name {
                "claim-many-answers-each-key-as-claim-would" => {
                    let (fresh, held, done) = (
                        format!("{k}:fresh"),
                        format!("{k}:held"),
                        format!("{k}:done"),
                    );
                    let twice = format!("{k}:twice");
                    acquire(s, &held, LEASE).await?;
                    let t = acquire(s, &done, LEASE).await?;
                    s.complete(&done, &t, TTL)
                        .await
                        .map_err(|e| call("complete", &e))?;
                    let keys = [
                        fresh.as_str(),
                        held.as_str(),
                        done.as_str(),
                        twice.as_str(),
                        twice.as_str(),
                    ];
                    let answers = s.claim_many(&keys, LEASE).await;
                    let tokens = match answers.as_slice() {
                        [
                            Ok(Claim::Acquired(a)),
                            Ok(Claim::Busy),
                            Ok(Claim::Done),
                            Ok(Claim::Acquired(b)),
                            Ok(Claim::Busy),
                        ] => [a.clone(), b.clone()],
                        other => {
                            return Err(format!(
                                "claim_many(fresh, held, done, twice, twice): expected \
                             [Acquired, Busy, Done, Acquired, Busy], got {other:?}"
                            ));
                        }
                    };
                    if tokens[0] == tokens[1] {
                        return Err(format!("claim_many repeated a token: {}", tokens[0]));
                    }
                    expect_claim(
                        s,
                        &fresh,
                        &Claim::Busy,
                        "a claim of a key claim_many acquired",
                    )
                    .await?;
                    s.complete(&fresh, &tokens[0], TTL)
                        .await
                        .map_err(|e| call("complete with a claim_many token", &e))?;
                    expect_claim(s, &fresh, &Claim::Done, "a claim after complete").await?;
                }
                _ => return Err(NOT_IN_GROUP.to_owned()),
            }
            Ok(())
        }
        .await,
    )
}

/// Cases `complete-many-fences-each-key-as-complete-would` to `complete-many-fences-each-key-as-complete-would`, in the contract's order.
async fn cases_5(name: &str, s: &dyn IdempotencyStore, k: &str) -> Option<CaseResultOf> {
    in_group(
        async {
            match name {
                "complete-many-fences-each-key-as-complete-would" => {
                    let (a, b, absent) =
                        (format!("{k}:a"), format!("{k}:b"), format!("{k}:absent"));
                    let ta = acquire(s, &a, LEASE).await?;
                    acquire(s, &b, LEASE).await?;
                    let forged = ClaimToken::random();
                    let claims = [
                        (a.as_str(), &ta),
                        (b.as_str(), &forged),
                        (absent.as_str(), &forged),
                    ];
                    let mut answers = s.complete_many(&claims, TTL).await.into_iter();
                    if answers.len() != 3 {
                        return Err(format!(
                            "complete_many of 3 claims answered {}",
                            answers.len()
                        ));
                    }
                    match answers.next() {
                        Some(Ok(())) => {}
                        other => {
                            return Err(format!(
                                "complete_many, the holder: expected Ok, got {other:?}"
                            ));
                        }
                    }
                    lease_lost(
                        answers.next().unwrap_or(Ok(())),
                        "complete_many with a foreign token",
                    )?;
                    lease_lost(
                        answers.next().unwrap_or(Ok(())),
                        "complete_many of an absent key",
                    )?;
                    expect_claim(s, &a, &Claim::Done, "the holder's key after complete_many")
                        .await?;
                    expect_claim(
                        s,
                        &b,
                        &Claim::Busy,
                        "a key a foreign token tried to complete",
                    )
                    .await?;
                    acquire(s, &absent, LEASE)
                        .await
                        .map_err(|e| format!("complete_many must not create an absent key: {e}"))?;
                }
                _ => return Err(NOT_IN_GROUP.to_owned()),
            }
            Ok(())
        }
        .await,
    )
}

/// Cases `concurrent-claims-have-one-winner` to `keys-are-opaque-and-independent`, in the contract's order.
async fn cases_6(name: &str, s: &dyn IdempotencyStore, k: &str) -> Option<CaseResultOf> {
    in_group(
        async {
            match name {
                "concurrent-claims-have-one-winner" => {
                    let answers =
                        futures_util::future::join_all((0..RACERS).map(|_| s.claim(k, LEASE)))
                            .await;
                    let mut acquired = 0;
                    for answer in answers {
                        match answer {
                            Ok(Claim::Acquired(_)) => acquired += 1,
                            Ok(Claim::Busy) => {}
                            other => return Err(format!("a racing claim answered {other:?}")),
                        }
                    }
                    if acquired != 1 {
                        return Err(format!(
                            "{acquired} of {RACERS} racing claims acquired the key"
                        ));
                    }
                }
                "keys-are-opaque-and-independent" => {
                    // Keys as the consumer makes them, `<group>:<key>`, with separators, spaces
                    // and non-ASCII text inside.
                    let a = format!("{k}:billing:order-42");
                    let b = format!("{k}:billing:order-42:x");
                    let c = format!("{k}:billing:Auftrag ü 42 ✓");
                    let ta = acquire(s, &a, LEASE).await?;
                    acquire(s, &b, LEASE)
                        .await
                        .map_err(|e| format!("a longer key: {e}"))?;
                    acquire(s, &c, LEASE)
                        .await
                        .map_err(|e| format!("a non-ASCII key: {e}"))?;
                    s.complete(&a, &ta, TTL)
                        .await
                        .map_err(|e| call("complete", &e))?;
                    expect_claim(
                        s,
                        &b,
                        &Claim::Busy,
                        "completing a key must not touch another",
                    )
                    .await?;
                    expect_claim(s, &a, &Claim::Done, "the completed key").await?;
                }
                _ => return Err(NOT_IN_GROUP.to_owned()),
            }
            Ok(())
        }
        .await,
    )
}

/// Cases `renew-extends-the-lease` to `renew-after-expired-lease-is-lease-lost`, in the contract's order.
async fn cases_7(name: &str, s: &dyn IdempotencyStore, k: &str) -> Option<CaseResultOf> {
    in_group(
        async {
            match name {
                "renew-extends-the-lease" => {
                    let t = acquire(s, k, SHORT).await?;
                    s.renew(k, &t, LEASE).await.map_err(|e| call("renew", &e))?;
                    tokio::time::sleep(PAST_SHORT).await;
                    expect_claim(
                        s,
                        k,
                        &Claim::Busy,
                        "a claim after the first lease ran out, within the renewed one",
                    )
                    .await?;
                    // Renewing again is fine, and the token still holds the key to the end.
                    s.renew(k, &t, LEASE)
                        .await
                        .map_err(|e| call("a second renew", &e))?;
                    s.complete(k, &t, TTL)
                        .await
                        .map_err(|e| call("complete after renew", &e))?;
                    expect_claim(s, k, &Claim::Done, "a claim after complete").await?;
                }
                "renew-with-a-foreign-token-is-lease-lost" => {
                    let held = acquire(s, k, SHORT).await?;
                    let forged = ClaimToken::random();
                    lease_lost(
                        s.renew(k, &forged, LEASE).await,
                        "renew with a foreign token",
                    )?;
                    expect_claim(s, k, &Claim::Busy, "the holder's claim must be untouched")
                        .await?;
                    tokio::time::sleep(PAST_SHORT).await;
                    acquire(s, k, LEASE).await.map_err(|e| {
                        format!("a foreign renew must not extend the holder's lease: {e}")
                    })?;
                    lease_lost(
                        s.renew(k, &held, LEASE).await,
                        "renew by the old holder after its lease ran out",
                    )?;
                }
                "renew-after-expired-lease-is-lease-lost" => {
                    let old = acquire(s, k, SHORT).await?;
                    tokio::time::sleep(PAST_SHORT).await;
                    lease_lost(
                        s.renew(k, &old, LEASE).await,
                        "renew after the lease ran out",
                    )?;
                    let new = acquire(s, k, SHORT)
                        .await
                        .map_err(|e| format!("a late renew must not revive the claim: {e}"))?;
                    lease_lost(
                        s.renew(k, &old, LEASE).await,
                        "renew with the old token after the key was claimed again",
                    )?;
                    tokio::time::sleep(PAST_SHORT).await;
                    acquire(s, k, LEASE).await.map_err(|e| {
                        format!("the old token's renew must not extend the new owner's lease: {e}")
                    })?;
                    lease_lost(
                        s.renew(k, &new, LEASE).await,
                        "renew by the second owner after its lease ran out",
                    )?;
                }
                _ => return Err(NOT_IN_GROUP.to_owned()),
            }
            Ok(())
        }
        .await,
    )
}

/// Cases `renew-after-release-is-lease-lost` to `renew-after-done-is-lease-lost`, in the contract's order.
async fn cases_8(name: &str, s: &dyn IdempotencyStore, k: &str) -> Option<CaseResultOf> {
    in_group(
        async {
            match name {
                "renew-after-release-is-lease-lost" => {
                    let t = acquire(s, k, LEASE).await?;
                    s.release(k, &t).await.map_err(|e| call("release", &e))?;
                    lease_lost(s.renew(k, &t, LEASE).await, "renew after release")?;
                    acquire(s, k, LEASE).await.map_err(|e| {
                        format!("a renew after release must not revive the claim: {e}")
                    })?;
                }
                "renew-after-done-is-lease-lost" => {
                    let t = acquire(s, k, LEASE).await?;
                    s.complete(k, &t, SHORT)
                        .await
                        .map_err(|e| call("complete", &e))?;
                    lease_lost(s.renew(k, &t, LEASE).await, "renew after complete")?;
                    expect_claim(s, k, &Claim::Done, "the key must stay done").await?;
                    tokio::time::sleep(PAST_SHORT).await;
                    acquire(s, k, LEASE)
                        .await
                        .map_err(|e| format!("a renew must not extend the done key's TTL: {e}"))?;
                }
                _ => return Err(NOT_IN_GROUP.to_owned()),
            }
            Ok(())
        }
        .await,
    )
}

fn call(what: &str, e: &StoreError) -> String {
    format!("{what} failed: {e}")
}

async fn acquire(
    s: &dyn IdempotencyStore,
    key: &str,
    lease: Duration,
) -> Result<ClaimToken, String> {
    match s.claim(key, lease).await {
        Ok(Claim::Acquired(token)) => Ok(token),
        other => Err(format!(
            "claim of {key:?}: expected Acquired, got {other:?}"
        )),
    }
}

async fn expect_claim(
    s: &dyn IdempotencyStore,
    key: &str,
    expected: &Claim,
    what: &str,
) -> Result<(), String> {
    match s.claim(key, LEASE).await {
        Ok(ref got) if got == expected => Ok(()),
        other => Err(format!("{what}: expected {expected:?}, got {other:?}")),
    }
}

fn lease_lost(result: Result<(), StoreError>, what: &str) -> Result<(), String> {
    match result {
        Err(StoreError::LeaseLost { .. }) => Ok(()),
        other => Err(format!("{what}: expected Err(LeaseLost), got {other:?}")),
    }
}
