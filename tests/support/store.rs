//! A store for consumer tests that sits in front of a real one: it records what the consumer
//! asked and what it was answered, and can fail the first claims as if the store were down.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kourier::idempotency::{claim_one_by_one, complete_one_by_one};
use kourier::{Claim, ClaimToken, IdempotencyStore, StoreError, async_trait};

/// What the store answered, as the consumer saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answer {
    Acquired(ClaimToken),
    Done,
    Busy,
    Completed,
    Released,
    Renewed,
    LeaseLost,
    Unavailable,
}

impl Answer {
    /// `claim:acquired`, `complete:lease-lost`, ...
    fn label(&self, op: &str) -> String {
        let answer = match self {
            Answer::Acquired(_) => "acquired",
            Answer::Done => "done",
            Answer::Busy => "busy",
            Answer::Completed => "completed",
            Answer::Released => "released",
            Answer::Renewed => "renewed",
            Answer::LeaseLost => "lease-lost",
            Answer::Unavailable => "unavailable",
        };
        format!("{op}:{answer}")
    }
}

#[derive(Debug, Clone)]
pub(crate) struct StoreCall {
    pub(crate) op: &'static str,
    pub(crate) key: String,
    /// The token passed to `complete` / `release` / `renew`.
    pub(crate) token: Option<ClaimToken>,
    pub(crate) answer: Answer,
    /// When the answer arrived.
    pub(crate) at: Instant,
}

/// Delegates to a real store and records every call; can fail the first claims as if the
/// store were down.
#[derive(Debug)]
pub(crate) struct SpyStore {
    inner: Arc<dyn IdempotencyStore>,
    calls: Mutex<Vec<StoreCall>>,
    /// Claims answered `Unavailable` without asking `inner`, before the rest go through.
    fail_first_claims: u32,
    claims: AtomicU32,
}

impl SpyStore {
    pub(crate) fn new(inner: Arc<dyn IdempotencyStore>) -> Arc<SpyStore> {
        SpyStore::failing_first_claims(inner, 0)
    }

    /// A spy whose first `n` claims fail as unavailable.
    pub(crate) fn failing_first_claims(inner: Arc<dyn IdempotencyStore>, n: u32) -> Arc<SpyStore> {
        Arc::new(SpyStore {
            inner,
            calls: Mutex::new(Vec::new()),
            fail_first_claims: n,
            claims: AtomicU32::new(0),
        })
    }

    pub(crate) fn calls_for(&self, key: &str) -> Vec<StoreCall> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.key == key)
            .cloned()
            .collect()
    }

    /// `op:answer` labels of the calls on `key`, in answer order.
    pub(crate) fn labels_for(&self, key: &str) -> Vec<String> {
        self.calls_for(key)
            .iter()
            .map(|c| c.answer.label(c.op))
            .collect()
    }

    /// [`labels_for`](Self::labels_for) as the store saw them, for records whose duplicate
    /// follows in the same partition: completions are written after the record released its
    /// lane, so the duplicate's claim may first answer busy (it waits: dropped here), and the
    /// spy, which logs a call when it returns, may log the completion after the claim that
    /// found the key done (put back in the store's order here).
    pub(crate) fn settled_labels_for(&self, key: &str) -> Vec<String> {
        let mut labels: Vec<String> = self
            .labels_for(key)
            .into_iter()
            .filter(|l| l != "claim:busy")
            .collect();
        for i in 1..labels.len() {
            if labels[i - 1] == "claim:done" && labels[i] == "complete:completed" {
                labels.swap(i - 1, i);
            }
        }
        labels
    }

    fn record(&self, op: &'static str, key: &str, token: Option<&ClaimToken>, answer: Answer) {
        self.calls.lock().unwrap().push(StoreCall {
            op,
            key: key.to_owned(),
            token: token.cloned(),
            answer,
            at: Instant::now(),
        });
    }

    fn settle_answer(result: &Result<(), StoreError>, ok: Answer) -> Answer {
        match result {
            Ok(()) => ok,
            Err(e) if e.is_lease_lost() => Answer::LeaseLost,
            Err(_) => Answer::Unavailable,
        }
    }
}

#[async_trait]
impl IdempotencyStore for SpyStore {
    async fn claim(&self, key: &str, lease: Duration) -> Result<Claim, StoreError> {
        let result = if self.claims.fetch_add(1, Ordering::SeqCst) < self.fail_first_claims {
            Err(StoreError::Unavailable {
                operation: "claim",
                source: "down for the test".into(),
            })
        } else {
            self.inner.claim(key, lease).await
        };
        let answer = match &result {
            Ok(Claim::Acquired(token)) => Answer::Acquired(token.clone()),
            Ok(Claim::Done) => Answer::Done,
            Ok(Claim::Busy) => Answer::Busy,
            // `Claim` is non-exhaustive; a future answer counts as not acquired.
            Ok(_) => Answer::Busy,
            Err(_) => Answer::Unavailable,
        };
        self.record("claim", key, None, answer);
        result
    }

    async fn complete(
        &self,
        key: &str,
        token: &ClaimToken,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let result = self.inner.complete(key, token, ttl).await;
        let answer = SpyStore::settle_answer(&result, Answer::Completed);
        self.record("complete", key, Some(token), answer);
        result
    }

    async fn release(&self, key: &str, token: &ClaimToken) -> Result<(), StoreError> {
        let result = self.inner.release(key, token).await;
        let answer = SpyStore::settle_answer(&result, Answer::Released);
        self.record("release", key, Some(token), answer);
        result
    }

    async fn renew(
        &self,
        key: &str,
        token: &ClaimToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let result = self.inner.renew(key, token, lease).await;
        let answer = SpyStore::settle_answer(&result, Answer::Renewed);
        self.record("renew", key, Some(token), answer);
        result
    }

    // One key at a time through the calls above, so that each is recorded (and the first
    // claims can fail).
    async fn claim_many(&self, keys: &[&str], lease: Duration) -> Vec<Result<Claim, StoreError>> {
        claim_one_by_one(self, keys, lease).await
    }

    async fn complete_many(
        &self,
        claims: &[(&str, &ClaimToken)],
        ttl: Duration,
    ) -> Vec<Result<(), StoreError>> {
        complete_one_by_one(self, claims, ttl).await
    }
}
