//! Coalesces the claims and completions of many workers into batch calls of the idempotency
//! store ([`IdempotencyStore::claim_many`], [`IdempotencyStore::complete_many`]): one round
//! trip for all the requests made while the previous batch was on its way.
//!
//! No timer: a request made while nothing is in flight goes out at once (alone), so batching
//! adds no latency when the store keeps up; requests made meanwhile wait for the batch in
//! flight and leave together in the next one. Each request still gets its own answer,
//! exactly what the single-key call would have answered (the store's contract for batches).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::worker::guarded_async;
use crate::idempotency::{Claim, ClaimToken, IdempotencyStore, StoreError};

/// At most this many requests of one kind go in one batch call.
const MAX_BATCH: usize = 256;

enum Request {
    Claim {
        key: String,
        lease: Duration,
        reply: oneshot::Sender<Result<Claim, StoreError>>,
    },
    Complete {
        key: String,
        token: ClaimToken,
        ttl: Duration,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
}

/// See the module docs. The batching task starts on first use (inside the runtime) and ends
/// when the batcher is dropped.
#[derive(Debug, Default)]
pub(crate) struct StoreBatcher {
    requests: OnceLock<mpsc::UnboundedSender<Request>>,
}

impl StoreBatcher {
    fn sender(&self, store: &Arc<dyn IdempotencyStore>) -> &mpsc::UnboundedSender<Request> {
        self.requests.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(run(store.clone(), rx));
            tx
        })
    }

    /// [`IdempotencyStore::claim`], batched with other workers' claims.
    pub(crate) async fn claim(
        &self,
        store: &Arc<dyn IdempotencyStore>,
        key: &str,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let (reply, answer) = oneshot::channel();
        let request = Request::Claim {
            key: key.to_owned(),
            lease,
            reply,
        };
        if self.sender(store).send(request).is_err() {
            return store.claim(key, lease).await;
        }
        answer.await.unwrap_or_else(|_| Err(lost("claim")))
    }

    /// [`IdempotencyStore::complete`], batched with other workers' completions.
    pub(crate) async fn complete(
        &self,
        store: &Arc<dyn IdempotencyStore>,
        key: &str,
        token: &ClaimToken,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        let request = Request::Complete {
            key: key.to_owned(),
            token: token.clone(),
            ttl,
            reply,
        };
        if self.sender(store).send(request).is_err() {
            return store.complete(key, token, ttl).await;
        }
        answer.await.unwrap_or_else(|_| Err(lost("complete")))
    }
}

/// The batching task went away without answering (the runtime is shutting down): an
/// availability error, so the record waits or is given up, never skipped.
fn lost(operation: &'static str) -> StoreError {
    StoreError::Unavailable {
        operation,
        source: "the idempotency batching task stopped".into(),
    }
}

fn panicked(operation: &'static str, panic: &str) -> StoreError {
    StoreError::Unavailable {
        operation,
        source: format!("the idempotency store panicked: {panic}").into(),
    }
}

async fn run(store: Arc<dyn IdempotencyStore>, mut rx: mpsc::UnboundedReceiver<Request>) {
    let mut requests = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut requests, MAX_BATCH).await > 0 {
        let mut claims = Vec::new();
        let mut completes = Vec::new();
        for request in requests.drain(..) {
            match request {
                Request::Claim { key, lease, reply } => claims.push((key, lease, reply)),
                Request::Complete {
                    key,
                    token,
                    ttl,
                    reply,
                } => completes.push((key, token, ttl, reply)),
            }
        }
        tokio::join!(
            claim_batch(&*store, claims),
            complete_batch(&*store, completes)
        );
    }
}

type ClaimRequest = (String, Duration, oneshot::Sender<Result<Claim, StoreError>>);
type CompleteRequest = (
    String,
    ClaimToken,
    Duration,
    oneshot::Sender<Result<(), StoreError>>,
);

/// The answer for each of `n` requests from a batch call's result: a panic or a store that
/// answered too few becomes an availability error (the record waits, never skips).
fn answers_for<T>(
    operation: &'static str,
    n: usize,
    result: Result<Vec<Result<T, StoreError>>, String>,
) -> Vec<Result<T, StoreError>> {
    let mut answers = match result {
        Ok(answers) => answers,
        Err(panic) => (0..n).map(|_| Err(panicked(operation, &panic))).collect(),
    };
    answers.truncate(n);
    while answers.len() < n {
        answers.push(Err(StoreError::Unavailable {
            operation,
            source: "the idempotency store answered fewer results than the batch had requests"
                .into(),
        }));
    }
    answers
}

/// One `claim_many` per lease (a consumer has one lease, so one call).
async fn claim_batch(store: &dyn IdempotencyStore, mut batch: Vec<ClaimRequest>) {
    while let Some(&(_, lease, _)) = batch.first() {
        let (same, rest): (Vec<_>, Vec<_>) = batch.into_iter().partition(|r| r.1 == lease);
        batch = rest;
        let keys: Vec<&str> = same.iter().map(|r| r.0.as_str()).collect();
        let result = guarded_async(store.claim_many(&keys, lease)).await;
        let answers = answers_for("claim", same.len(), result);
        for ((_, _, reply), answer) in same.into_iter().zip(answers) {
            let _ = reply.send(answer);
        }
    }
}

/// One `complete_many` per TTL (a consumer has one TTL, so one call).
async fn complete_batch(store: &dyn IdempotencyStore, mut batch: Vec<CompleteRequest>) {
    while let Some(&(_, _, ttl, _)) = batch.first() {
        let (same, rest): (Vec<_>, Vec<_>) = batch.into_iter().partition(|r| r.2 == ttl);
        batch = rest;
        let claims: Vec<(&str, &ClaimToken)> = same.iter().map(|r| (r.0.as_str(), &r.1)).collect();
        let result = guarded_async(store.complete_many(&claims, ttl)).await;
        let answers = answers_for("complete", same.len(), result);
        drop(claims);
        for ((_, _, _, reply), answer) in same.into_iter().zip(answers) {
            let _ = reply.send(answer);
        }
    }
}
