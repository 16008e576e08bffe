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

/// At most this many requests go in one batch call.
const MAX_BATCH: usize = 256;

type ClaimRequest = (String, Duration, oneshot::Sender<Result<Claim, StoreError>>);
type CompleteRequest = (
    String,
    ClaimToken,
    Duration,
    oneshot::Sender<Result<(), StoreError>>,
);

/// See the module docs. Claims and completions go through separate batching tasks, so a
/// slow completion never holds up the claims that start records. Each task starts on first
/// use (inside the runtime) and ends when the batcher is dropped.
#[derive(Debug, Default)]
pub(crate) struct StoreBatcher {
    claims: OnceLock<mpsc::UnboundedSender<ClaimRequest>>,
    completes: OnceLock<mpsc::UnboundedSender<CompleteRequest>>,
}

impl StoreBatcher {
    /// [`IdempotencyStore::claim`], batched with other workers' claims.
    pub(crate) async fn claim(
        &self,
        store: &Arc<dyn IdempotencyStore>,
        key: &str,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let (reply, answer) = oneshot::channel();
        let requests = self.claims.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(batching(store.clone(), rx, claim_batch));
            tx
        });
        if requests.send((key.to_owned(), lease, reply)).is_err() {
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
        let requests = self.completes.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(batching(store.clone(), rx, complete_batch));
            tx
        });
        if requests
            .send((key.to_owned(), token.clone(), ttl, reply))
            .is_err()
        {
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

/// Takes every request waiting (up to [`MAX_BATCH`]) and answers them with one batch call,
/// until the batcher is dropped.
async fn batching<R, F>(
    store: Arc<dyn IdempotencyStore>,
    mut rx: mpsc::UnboundedReceiver<R>,
    batch: impl Fn(Arc<dyn IdempotencyStore>, Vec<R>) -> F,
) where
    F: std::future::Future<Output = ()>,
{
    let mut requests = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut requests, MAX_BATCH).await > 0 {
        batch(store.clone(), std::mem::take(&mut requests)).await;
    }
}

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
async fn claim_batch(store: Arc<dyn IdempotencyStore>, mut batch: Vec<ClaimRequest>) {
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
async fn complete_batch(store: Arc<dyn IdempotencyStore>, mut batch: Vec<CompleteRequest>) {
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
