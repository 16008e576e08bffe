//! A store for consumer tests that sits in front of a real one: it records what the consumer
//! asked and what it was answered, and can fail the first claims as if the store were down.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kourier::idempotency::testing::{HookedStore, StoreAnswer, StoreCall as Call, StoreHook};
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

/// A real store with a [`SpyStore`] in front.
pub(crate) type Spied = HookedStore<dyn IdempotencyStore, SpyStore>;

/// Records every call on its way to a real store, one key at a time; can fail the first
/// claims as if the store were down.
#[derive(Debug)]
pub(crate) struct SpyStore {
    calls: Mutex<Vec<StoreCall>>,
    /// Claims answered `Unavailable` without asking the store, before the rest go through.
    fail_first_claims: u32,
    claims: AtomicU32,
}

impl SpyStore {
    /// `inner`, spied on (the spy is its [`hook`](HookedStore::hook)).
    pub(crate) fn new(inner: Arc<dyn IdempotencyStore>) -> Arc<Spied> {
        SpyStore::failing_first_claims(inner, 0)
    }

    /// `inner`, spied on, whose first `n` claims fail as unavailable.
    pub(crate) fn failing_first_claims(inner: Arc<dyn IdempotencyStore>, n: u32) -> Arc<Spied> {
        let spy = SpyStore {
            calls: Mutex::new(Vec::new()),
            fail_first_claims: n,
            claims: AtomicU32::new(0),
        };
        // One key at a time, so that each is recorded (and the first claims can fail).
        Arc::new(HookedStore::new(inner, spy).one_by_one())
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
impl StoreHook for SpyStore {
    async fn before(&self, call: &Call<'_>) -> Result<(), StoreError> {
        if let Call::Claim { .. } = call
            && self.claims.fetch_add(1, Ordering::SeqCst) < self.fail_first_claims
        {
            return Err(StoreError::Unavailable {
                operation: "claim",
                source: "down for the test".into(),
            });
        }
        Ok(())
    }

    fn after(&self, call: &Call<'_>, answer: StoreAnswer<'_>) {
        let answer = match answer {
            StoreAnswer::Claim(result) => match result {
                Ok(Claim::Acquired(token)) => Answer::Acquired(token.clone()),
                Ok(Claim::Done) => Answer::Done,
                Ok(Claim::Busy) => Answer::Busy,
                // `Claim` is non-exhaustive; a future answer counts as not acquired.
                Ok(_) => Answer::Busy,
                Err(_) => Answer::Unavailable,
            },
            StoreAnswer::TokenCall(result) => {
                let ok = match call {
                    Call::Complete { .. } => Answer::Completed,
                    Call::Release { .. } => Answer::Released,
                    _ => Answer::Renewed,
                };
                SpyStore::settle_answer(result, ok)
            }
            // Batches come one key at a time (`one_by_one`).
            _ => return,
        };
        let key = call.key().expect("a single-key call");
        self.record(call.operation(), key, call.token(), answer);
    }
}

/// Holds every completion until it is opened (the store slow to mark keys done).
#[derive(Debug)]
pub(crate) struct HeldCompletions(pub(crate) tokio::sync::watch::Receiver<bool>);

#[async_trait]
impl StoreHook for HeldCompletions {
    async fn before(&self, call: &Call<'_>) -> Result<(), StoreError> {
        if matches!(call, Call::Complete { .. } | Call::CompleteMany { .. }) {
            let _ = self.0.clone().wait_for(|open| *open).await;
        }
        Ok(())
    }
}
