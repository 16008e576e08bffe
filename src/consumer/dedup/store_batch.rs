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

use crate::guard::guarded_async;
use crate::idempotency::{Claim, ClaimToken, IdempotencyStore, StoreError};

/// At most this many requests go in one batch call.
const MAX_BATCH: usize = 256;

/// How many times the batching task yields to gather more requests before it sends a batch.
const GATHER_YIELDS: usize = 4;

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
        if self
            .claims(store)
            .send((key.to_owned(), lease, reply))
            .is_err()
        {
            return store.claim(key, lease).await;
        }
        answer.await.unwrap_or_else(|_| Err(lost("claim")))
    }

    /// Claims each of `keys`, in one batch (with other workers' claims, unless there are
    /// more than fit one); one answer per key, in order.
    pub(crate) async fn claim_all(
        &self,
        store: &Arc<dyn IdempotencyStore>,
        keys: Vec<String>,
        lease: Duration,
    ) -> Vec<Result<Claim, StoreError>> {
        let requests = self.claims(store);
        let mut answers = Vec::with_capacity(keys.len());
        for key in keys {
            let (reply, answer) = oneshot::channel();
            if let Err(mpsc::error::SendError((key, _, _))) = requests.send((key, lease, reply)) {
                let (reply, answer) = oneshot::channel();
                let _ = reply.send(store.claim(&key, lease).await);
                answers.push(answer);
                continue;
            }
            answers.push(answer);
        }
        let mut results = Vec::with_capacity(answers.len());
        for answer in answers {
            results.push(answer.await.unwrap_or_else(|_| Err(lost("claim"))));
        }
        results
    }

    fn claims(&self, store: &Arc<dyn IdempotencyStore>) -> &mpsc::UnboundedSender<ClaimRequest> {
        self.claims.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(batching(store.clone(), rx, claim_batch));
            tx
        })
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
        // Let the workers that are running right now add theirs: a yield costs
        // microseconds, a round trip saved costs tens.
        // Yield while more keep coming (a few times at most).
        for _ in 0..GATHER_YIELDS {
            tokio::task::yield_now().await;
            let before = requests.len();
            while requests.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(request) => requests.push(request),
                    Err(_) => break,
                }
            }
            if requests.len() == before || requests.len() == MAX_BATCH {
                break;
            }
        }
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
        for ((key, _, reply), answer) in same.into_iter().zip(answers) {
            // The requester is gone (its record was given up while it waited): a claim
            // acquired for it would hold its key for a whole lease. Released now.
            if let Err(Ok(Claim::Acquired(token))) = reply.send(answer) {
                let _ = guarded_async(store.release(&key, &token)).await;
            }
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;
    use tokio::sync::Semaphore;

    use super::*;
    use crate::idempotency::memory::InMemoryIdempotencyStore;
    use crate::idempotency::testing::{HookedStore, StoreCall, StoreHook};

    /// Records the size of each `claim_many` batch, the first of which waits for `gate`.
    #[derive(Debug)]
    struct Batches {
        sizes: Mutex<Vec<usize>>,
        gate: Semaphore,
    }

    #[async_trait]
    impl StoreHook for Batches {
        async fn before(&self, call: &StoreCall<'_>) -> Result<(), StoreError> {
            let StoreCall::ClaimMany { keys, .. } = call else {
                return Ok(());
            };
            let first = {
                let mut sizes = self.sizes.lock().unwrap();
                sizes.push(keys.len());
                sizes.len() == 1
            };
            if first {
                let _permit = self.gate.acquire().await.unwrap();
            }
            Ok(())
        }
    }

    /// The in-memory store, recording its batches.
    type Recording = HookedStore<InMemoryIdempotencyStore, Batches>;

    const LEASE: Duration = Duration::from_secs(60);

    /// The recording store (its first batch held until `gate` gets a permit), as a store,
    /// and a batcher in front of it.
    fn batched() -> (Arc<Recording>, Arc<dyn IdempotencyStore>, Arc<StoreBatcher>) {
        let hook = Batches {
            sizes: Mutex::new(Vec::new()),
            gate: Semaphore::new(0),
        };
        let batches = Arc::new(HookedStore::new(
            Arc::new(InMemoryIdempotencyStore::new()),
            hook,
        ));
        let store: Arc<dyn IdempotencyStore> = batches.clone();
        (batches, store, Arc::new(StoreBatcher::default()))
    }

    #[tokio::test]
    async fn requests_made_while_a_batch_is_in_flight_leave_together_and_completions_do_not_wait() {
        let (batches, store, batcher) = batched();
        let claim = |key: &'static str| {
            let (b, s) = (batcher.clone(), store.clone());
            tokio::spawn(async move { b.claim(&s, key, LEASE).await })
        };
        let first = claim("a");
        while batches.hook().sizes.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        let rest = [claim("b"), claim("c"), claim("b")];
        // A completion is not held up by the claim batch in flight.
        let Claim::Acquired(token) = store.claim("done", LEASE).await.unwrap() else {
            panic!("fresh key");
        };
        batcher
            .complete(&store, "done", &token, LEASE)
            .await
            .expect("completed while a claim batch waits");
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        batches.hook().gate.add_permits(1);
        assert!(matches!(first.await.unwrap(), Ok(Claim::Acquired(_))));
        let mut answers = Vec::new();
        for r in rest {
            answers.push(r.await.unwrap());
        }
        assert!(matches!(answers[0], Ok(Claim::Acquired(_))));
        assert!(matches!(answers[1], Ok(Claim::Acquired(_))));
        assert!(
            matches!(answers[2], Ok(Claim::Busy)),
            "each key claimed on its own"
        );
        assert_eq!(*batches.hook().sizes.lock().unwrap(), [1, 3]);
        assert_eq!(store.claim("done", LEASE).await.unwrap(), Claim::Done);
    }

    /// The batching task gathers what arrives while it yields: a request sent after the
    /// task took the waiting ones joins their batch.
    #[tokio::test]
    async fn a_request_arriving_while_the_batch_gathers_joins_it() {
        let (batches, store, batcher) = batched();
        batches.hook().gate.add_permits(1);
        let claim = |key: &'static str| {
            let (b, s) = (batcher.clone(), store.clone());
            async move { b.claim(&s, key, LEASE).await }
        };
        // "a" starts the batching task, "b" is sent before it runs and spawns "c", which
        // runs (and sends) only after the batching task took "a" and "b".
        let a = tokio::spawn(claim("a"));
        let (second, third) = (claim("b"), claim("c"));
        let b = tokio::spawn(async move {
            let c = tokio::spawn(third);
            (second.await, c)
        });
        let (answer_b, c) = b.await.unwrap();
        for answer in [a.await.unwrap(), answer_b, c.await.unwrap()] {
            assert!(matches!(answer, Ok(Claim::Acquired(_))), "{answer:?}");
        }
        assert_eq!(*batches.hook().sizes.lock().unwrap(), [3], "one batch");
    }

    /// Each request gets exactly one answer: a store answering too few is padded with
    /// availability errors (the records wait, never skip), too many are cut, a panic answers
    /// every request with an availability error.
    #[test]
    fn every_request_gets_exactly_one_answer() {
        let unavailable = |a: &Result<u8, StoreError>| {
            matches!(
                a,
                Err(StoreError::Unavailable {
                    operation: "claim",
                    ..
                })
            )
        };
        let exact = answers_for("claim", 2, Ok(vec![Ok(1), Ok(2)]));
        assert!(matches!(exact[..], [Ok(1), Ok(2)]), "{exact:?}");
        let few = answers_for("claim", 3, Ok(vec![Ok(1u8)]));
        assert_eq!(few.len(), 3);
        assert!(matches!(few[0], Ok(1)) && unavailable(&few[1]) && unavailable(&few[2]));
        let many = answers_for("claim", 1, Ok(vec![Ok(1u8), Ok(2)]));
        assert!(matches!(many[..], [Ok(1)]), "{many:?}");
        let panic = answers_for::<u8>("claim", 2, Err("boom".into()));
        assert_eq!(panic.len(), 2);
        assert!(panic.iter().all(unavailable), "{panic:?}");
        assert!(
            panic[0].as_ref().unwrap_err().to_string().contains("boom")
                || format!("{:?}", panic[0]).contains("boom")
        );
    }

    /// A batch holds at most [`MAX_BATCH`] requests.
    #[tokio::test]
    async fn a_batch_holds_at_most_max_batch_requests() {
        let (batches, store, batcher) = batched();
        batches.hook().gate.add_permits(1);
        let keys: Vec<String> = (0..2 * MAX_BATCH + 3).map(|i| format!("k{i}")).collect();
        let tasks: Vec<_> = keys
            .into_iter()
            .map(|key| {
                let (b, s) = (batcher.clone(), store.clone());
                tokio::spawn(async move { b.claim(&s, &key, LEASE).await })
            })
            .collect();
        for t in tasks {
            assert!(matches!(t.await.unwrap(), Ok(Claim::Acquired(_))));
        }
        assert_eq!(
            *batches.hook().sizes.lock().unwrap(),
            [MAX_BATCH, MAX_BATCH, 3]
        );
    }

    /// The batching tasks end when the batcher is dropped (they hold the store).
    #[tokio::test]
    async fn the_batching_tasks_end_with_the_batcher() {
        let (batches, store, batcher) = batched();
        batches.hook().gate.add_permits(1);
        let Ok(Claim::Acquired(token)) = batcher.claim(&store, "k", LEASE).await else {
            panic!("fresh key");
        };
        batcher.complete(&store, "k", &token, LEASE).await.unwrap();
        assert_eq!(
            Arc::strong_count(&batches),
            4,
            "the test's two and the two tasks'"
        );
        drop(batcher);
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(Arc::strong_count(&batches), 2, "the tasks ended");
    }

    /// A claim whose requester went away while its batch was in flight (its record given up
    /// at a revoke) is released at once, not left to hold its key for a whole lease.
    #[tokio::test]
    async fn a_claim_acquired_for_a_requester_that_is_gone_is_released() {
        let (batches, store, batcher) = batched();
        let (b, s) = (batcher.clone(), store.clone());
        let waiting = tokio::spawn(async move { b.claim(&s, "k", LEASE).await });
        while batches.hook().sizes.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        waiting.abort();
        let _ = waiting.await;
        batches.hook().gate.add_permits(1);
        // Batches go out one after the other: once a later claim is answered, the batch of
        // the gone requester was answered (and its claim released) before it.
        let later = batcher.claim(&store, "other", LEASE).await.unwrap();
        assert!(matches!(later, Claim::Acquired(_)));
        let answer = batches.inner().claim("k", LEASE).await.unwrap();
        assert!(
            matches!(answer, Claim::Acquired(_)),
            "the orphaned claim still holds the key: {answer:?}"
        );
    }
}
