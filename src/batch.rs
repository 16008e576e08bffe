//! Handlers that take many records in one call (a bulk insert, a bulk mail or push API, a
//! search-index batch): [`BatchHandler`] and the [`batched`] adapter that makes one a
//! [`Handler`].
//!
//! # How records are gathered
//!
//! The consumer still runs records one by one — its lanes, retries, dead letters, idempotency
//! claims, breakers and outcome observer all work per record, as for any handler. The
//! adapter gathers the records whose attempts are running at the same moment into a batch:
//! a batch is called when it holds [`max_records`](Batched::max_records) records or
//! [`max_bytes`](Batched::max_bytes) bytes of keys and values, or when its first record has
//! waited [`linger`](Batched::linger) (default 100 records, 1 MiB, 5 ms), with at most
//! [`max_concurrent_batches`](Batched::max_concurrent_batches) calls at once (default 4;
//! while they are all busy, records gather into the next batch).
//!
//! So a batch holds at most as many records as run at once, and the consumer's ordering
//! decides that: in [`Unordered`](crate::ProcessingOrder::Unordered) order up to
//! [`max_in_flight`](crate::RetryingConsumerBuilder::max_in_flight); in
//! [`Key`](crate::ProcessingOrder::Key) order one record per key (the records of one key never
//! share a batch, and a key's next record waits for its previous one's outcome, so order within
//! a key holds); in [`Partition`](crate::ProcessingOrder::Partition) order one record per
//! partition, which makes small batches. Raise `max_in_flight` (in `Key` or `Unordered`
//! order) to fill larger batches.
//!
//! # Outcomes
//!
//! [`BatchHandler::handle_batch`] answers with a [`BatchOutcome`]: every record handled,
//! one result per record, a failure at index `n` (the records before it handled, the rest
//! **not attempted**), or one failure for all. A record that was not attempted goes into the
//! next batch without using an attempt; a failed record takes its own path (its retry policy,
//! its dead letter, its breaker) exactly as if a single-record handler had returned that
//! error, and a retried one joins a later batch. A batch call that panics fails each of its
//! records as a panic. A batch that gives no outcome to any of its records (an empty
//! [`BatchOutcome::each`]) fails them as transient, so a handler cannot loop a batch forever.
//!
//! With a [`handler_timeout`](crate::RetryingConsumerBuilder::handler_timeout), a record's
//! attempt includes its wait for its batch; a record given up (a timeout, a revoke, the
//! shutdown deadline) before its batch was called is left out of it, and one given up after
//! lets the call run to its end (its result is dropped; the record is delivered again).

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Notify, Semaphore, oneshot};

use crate::clock;
use crate::guard::guarded_async;
use crate::handler::{Handler, HandlerError};
use crate::message::Message;

/// Handles many records of one event type in one call. Wrap it with [`batched`] to get a
/// [`Handler`]; see the [module docs](self) for how records are gathered.
///
/// ```
/// use kourier::batch::{batched, BatchHandler, BatchOutcome};
/// use kourier::{async_trait, HandlerError, Message};
///
/// struct BulkInsert;
///
/// #[async_trait]
/// impl BatchHandler for BulkInsert {
///     type Event = String;
///
///     async fn handle_batch(&self, batch: &[Message<String>]) -> BatchOutcome {
///         // e.g. one multi-row INSERT; a row the database refuses is the record's own fault
///         match batch.iter().position(|m| m.event().is_empty()) {
///             Some(bad) => BatchOutcome::failed_at(bad, HandlerError::permanent("empty row")),
///             None => BatchOutcome::all_ok(),
///         }
///     }
/// }
///
/// let handler = batched(BulkInsert).max_records(500); // a kourier::Handler
/// # let _ = handler;
/// ```
#[async_trait]
pub trait BatchHandler: Send + Sync + 'static {
    /// The decoded event type.
    type Event: Send + Sync + 'static;

    /// Handles one batch (at least one record, in the order they were gathered): one attempt
    /// of each record.
    async fn handle_batch(&self, batch: &[Message<Self::Event>]) -> BatchOutcome;
}

/// What a [`BatchHandler::handle_batch`] call says about its records.
#[derive(Debug)]
pub struct BatchOutcome(Outcome);

#[derive(Debug)]
enum Outcome {
    AllOk,
    FailedAt(usize, HandlerError),
    Each(Vec<Result<(), HandlerError>>),
    AllFailed(HandlerError),
}

impl BatchOutcome {
    /// Every record of the batch was handled.
    pub fn all_ok() -> Self {
        BatchOutcome(Outcome::AllOk)
    }

    /// The records before `index` were handled, the record at `index` failed with `error`,
    /// and the rest were **not attempted**: they go into the next batch without using an
    /// attempt (Spring Kafka's `BatchListenerFailedException`). An `index` past the batch's
    /// end means every record was handled.
    pub fn failed_at(index: usize, error: HandlerError) -> Self {
        BatchOutcome(Outcome::FailedAt(index, error))
    }

    /// One result per record, in the batch's order. Records past the end of `results` were
    /// not attempted (the next batch takes them); results past the batch's end are ignored.
    pub fn each(results: Vec<Result<(), HandlerError>>) -> Self {
        BatchOutcome(Outcome::Each(results))
    }

    /// Every record of the batch failed with `error` (each gets its kind, hint and message):
    /// a bulk call that failed as a whole (the downstream is down, a timeout).
    pub fn all_failed(error: HandlerError) -> Self {
        BatchOutcome(Outcome::AllFailed(error))
    }
}

/// Makes a [`BatchHandler`] a [`Handler`] (see the [module docs](self)), with the default
/// limits: 100 records, 1 MiB, a 5 ms linger, 4 batches at once.
pub fn batched<B: BatchHandler>(handler: B) -> Batched<B> {
    Batched {
        handler: Arc::new(handler),
        limits: Limits {
            max_records: 100,
            max_bytes: 1 << 20,
            linger: Duration::from_millis(5),
            max_concurrent: 4,
        },
        shared: Arc::new(Shared {
            queue: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
            closed: AtomicBool::new(false),
        }),
        collector: OnceLock::new(),
    }
}

#[derive(Debug, Clone, Copy)]
struct Limits {
    max_records: usize,
    max_bytes: usize,
    linger: Duration,
    max_concurrent: usize,
}

/// A record waiting for its batch, and where its result goes.
struct Pending<T> {
    message: Message<T>,
    bytes: usize,
    result: oneshot::Sender<Result<(), HandlerError>>,
}

struct Shared<T> {
    queue: Mutex<VecDeque<Pending<T>>>,
    /// A record came, or records came back.
    wake: Notify,
    /// The adapter was dropped: the collector stops.
    closed: AtomicBool,
}

impl<T> Shared<T> {
    fn queue(&self) -> MutexGuard<'_, VecDeque<Pending<T>>> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The [`Handler`] made by [`batched`].
pub struct Batched<B: BatchHandler> {
    handler: Arc<B>,
    limits: Limits,
    shared: Arc<Shared<B::Event>>,
    /// Started on the first record, on the consumer's runtime.
    collector: OnceLock<()>,
}

impl<B: BatchHandler> fmt::Debug for Batched<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batched")
            .field("handler", &std::any::type_name::<B>())
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl<B: BatchHandler> Batched<B> {
    /// At most `n` records per batch (at least 1; default 100).
    #[must_use]
    pub fn max_records(mut self, n: usize) -> Self {
        self.limits.max_records = n.max(1);
        self
    }

    /// At most about `bytes` of record keys and values per batch (default 1 MiB); a record
    /// larger than that alone makes a batch of one.
    #[must_use]
    pub fn max_bytes(mut self, bytes: usize) -> Self {
        self.limits.max_bytes = bytes.max(1);
        self
    }

    /// How long a batch's first record waits for others before the batch is called
    /// (default 5 ms; at most a day, longer is taken as a day).
    #[must_use]
    pub fn linger(mut self, linger: Duration) -> Self {
        self.limits.linger = linger.min(Duration::from_secs(86_400));
        self
    }

    /// At most `n` batch calls at once (at least 1; default 4).
    #[must_use]
    pub fn max_concurrent_batches(mut self, n: usize) -> Self {
        self.limits.max_concurrent = n.clamp(1, Semaphore::MAX_PERMITS);
        self
    }

    fn start_collector(&self) {
        self.collector.get_or_init(|| {
            tokio::spawn(collect(
                self.handler.clone(),
                self.shared.clone(),
                self.limits,
            ));
        });
    }
}

impl<B: BatchHandler> Drop for Batched<B> {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.wake.notify_one();
    }
}

#[async_trait]
impl<B: BatchHandler> Handler for Batched<B> {
    type Event = B::Event;

    async fn handle(&self, message: &Message<B::Event>) -> Result<(), HandlerError> {
        self.start_collector();
        let raw = message.raw();
        let bytes =
            raw.key.as_ref().map_or(0, |k| k.len()) + raw.value.as_ref().map_or(0, |v| v.len());
        let (tx, rx) = oneshot::channel();
        self.shared.queue().push_back(Pending {
            message: message.clone(),
            bytes,
            result: tx,
        });
        self.shared.wake.notify_one();
        rx.await.unwrap_or_else(|_| {
            Err(HandlerError::transient(
                "the batch collector stopped before the record's batch ran",
            ))
        })
    }
}

/// Whether the queue holds a full batch.
fn full<T>(queue: &VecDeque<Pending<T>>, limits: Limits) -> bool {
    queue.len() >= limits.max_records
        || queue.iter().map(|p| p.bytes).sum::<usize>() >= limits.max_bytes
}

/// Takes the next batch from the front of the queue, leaving out records given up already.
fn take_batch<T>(queue: &mut VecDeque<Pending<T>>, limits: Limits) -> Vec<Pending<T>> {
    let mut batch = Vec::new();
    let mut bytes = 0usize;
    while let Some(next) = queue.front() {
        if next.result.is_closed() {
            queue.pop_front();
            continue;
        }
        if !batch.is_empty()
            && (batch.len() >= limits.max_records
                || bytes.saturating_add(next.bytes) > limits.max_bytes)
        {
            break;
        }
        bytes = bytes.saturating_add(next.bytes);
        batch.extend(queue.pop_front());
    }
    batch
}

/// The collector: waits for a first record, then for a full batch or the linger, then for a
/// free call, and runs the batch on a task of its own.
async fn collect<B: BatchHandler>(handler: Arc<B>, shared: Arc<Shared<B::Event>>, limits: Limits) {
    let calls = Arc::new(Semaphore::new(limits.max_concurrent));
    loop {
        while shared.queue().is_empty() {
            if shared.closed.load(Ordering::Acquire) {
                return;
            }
            shared.wake.notified().await;
        }
        let deadline = clock::deadline_in(limits.linger);
        loop {
            if full(&shared.queue(), limits) || shared.closed.load(Ordering::Acquire) {
                break;
            }
            tokio::select! {
                () = shared.wake.notified() => {}
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        let Ok(call) = calls.clone().acquire_owned().await else {
            return;
        };
        let batch = take_batch(&mut shared.queue(), limits);
        if batch.is_empty() {
            continue;
        }
        let (handler, shared) = (handler.clone(), shared.clone());
        tokio::spawn(async move {
            run_batch(&*handler, &shared, batch).await;
            drop(call);
        });
    }
}

/// Calls the handler with one batch and hands each record its result; records not attempted
/// go back to the front of the queue, in order.
async fn run_batch<B: BatchHandler>(
    handler: &B,
    shared: &Shared<B::Event>,
    batch: Vec<Pending<B::Event>>,
) {
    let messages: Vec<Message<B::Event>> = batch.iter().map(|p| p.message.clone()).collect();
    let outcome = match guarded_async(handler.handle_batch(&messages)).await {
        Ok(outcome) => outcome.0,
        Err(panic) => Outcome::AllFailed(HandlerError::panic(format!(
            "batch handler panicked: {panic}"
        ))),
    };
    let len = batch.len();
    let mut results: Vec<Option<Result<(), HandlerError>>> = match outcome {
        Outcome::AllOk => (0..len).map(|_| Some(Ok(()))).collect(),
        Outcome::AllFailed(error) => (0..len).map(|_| Some(Err(error.duplicate()))).collect(),
        Outcome::FailedAt(index, error) => {
            let mut error = Some(error);
            (0..len)
                .map(|i| match i.cmp(&index) {
                    std::cmp::Ordering::Less => Some(Ok(())),
                    std::cmp::Ordering::Equal => error.take().map(Err),
                    std::cmp::Ordering::Greater => None,
                })
                .collect()
        }
        Outcome::Each(each) => {
            let mut each = each.into_iter();
            (0..len).map(|_| each.next()).collect()
        }
    };
    if results.iter().all(Option::is_none) {
        // No record attempted: failed rather than sent round again (no progress to make).
        for r in &mut results {
            *r = Some(Err(HandlerError::transient(
                "the batch handler gave no outcome for this record",
            )));
        }
    }
    let mut again = Vec::new();
    for (pending, result) in batch.into_iter().zip(results) {
        match result {
            // The record may have been given up meanwhile: its result is dropped.
            Some(result) => drop(pending.result.send(result)),
            None => again.push(pending),
        }
    }
    if !again.is_empty() {
        let mut queue = shared.queue();
        for pending in again.into_iter().rev() {
            queue.push_front(pending);
        }
        drop(queue);
        shared.wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::handler::FailureKind;
    use crate::record::RawRecord;

    /// Records every batch's ids; fails per `outcome`.
    struct Recording<F> {
        batches: Mutex<Vec<Vec<u32>>>,
        running: AtomicUsize,
        most_at_once: AtomicUsize,
        outcome: F,
    }

    #[async_trait]
    impl<F> BatchHandler for Recording<F>
    where
        F: Fn(usize, &[Message<u32>]) -> BatchOutcome + Send + Sync + 'static,
    {
        type Event = u32;

        async fn handle_batch(&self, batch: &[Message<u32>]) -> BatchOutcome {
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_at_once.fetch_max(now, Ordering::SeqCst);
            let call = {
                let mut b = self.batches.lock().unwrap();
                b.push(batch.iter().map(|m| *m.event()).collect());
                b.len() - 1
            };
            tokio::time::sleep(Duration::from_millis(10)).await;
            self.running.fetch_sub(1, Ordering::SeqCst);
            (self.outcome)(call, batch)
        }
    }

    fn recording<F>(outcome: F) -> Arc<Batched<Recording<F>>>
    where
        F: Fn(usize, &[Message<u32>]) -> BatchOutcome + Send + Sync + 'static,
    {
        Arc::new(batched(Recording {
            batches: Mutex::new(Vec::new()),
            running: AtomicUsize::new(0),
            most_at_once: AtomicUsize::new(0),
            outcome,
        }))
    }

    fn message(id: u32) -> Message<u32> {
        let raw = RawRecord::builder("t")
            .offset(i64::from(id))
            .value(vec![0; 10])
            .build();
        Message::new(Arc::new(raw), 1, id)
    }

    /// Handles records `ids` at once through `h`: each record's result, in `ids` order.
    async fn handle_all<B: BatchHandler<Event = u32>>(
        h: &Arc<Batched<B>>,
        ids: impl IntoIterator<Item = u32>,
    ) -> Vec<Result<(), FailureKind>> {
        let tasks: Vec<_> = ids
            .into_iter()
            .map(|id| {
                let h = h.clone();
                tokio::spawn(async move { h.handle(&message(id)).await.map_err(|e| e.kind()) })
            })
            .collect();
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.unwrap());
        }
        results
    }

    fn batches<F>(h: &Batched<Recording<F>>) -> Vec<Vec<u32>>
    where
        F: Fn(usize, &[Message<u32>]) -> BatchOutcome + Send + Sync + 'static,
    {
        h.handler.batches.lock().unwrap().clone()
    }

    #[tokio::test(start_paused = true)]
    async fn records_running_at_once_share_a_batch() {
        let h = recording(|_, _| BatchOutcome::all_ok());
        assert_eq!(handle_all(&h, 0..10).await, vec![Ok(()); 10]);
        assert_eq!(batches(&h), [Vec::from_iter(0..10)]);
    }

    #[tokio::test(start_paused = true)]
    async fn limits_cut_batches_and_bound_calls_at_once() {
        let h = Arc::new(
            Arc::into_inner(recording(|_, _| BatchOutcome::all_ok()))
                .unwrap()
                .max_records(4)
                .max_concurrent_batches(2),
        );
        assert_eq!(handle_all(&h, 0..10).await, vec![Ok(()); 10]);
        let sizes: Vec<usize> = batches(&h).iter().map(Vec::len).collect();
        assert_eq!(sizes, [4, 4, 2]);
        assert_eq!(h.handler.most_at_once.load(Ordering::SeqCst), 2);
    }

    /// `failed_at(3)`: the three before are handled, the fourth fails with its kind, the rest
    /// were not attempted and run in the next batch.
    #[tokio::test(start_paused = true)]
    async fn a_failure_at_an_index_leaves_the_rest_for_the_next_batch() {
        let h = recording(|call, _| match call {
            0 => BatchOutcome::failed_at(3, HandlerError::permanent("row 3 is bad")),
            _ => BatchOutcome::all_ok(),
        });
        let results = handle_all(&h, 0..6).await;
        assert_eq!(
            results,
            [
                Ok(()),
                Ok(()),
                Ok(()),
                Err(FailureKind::Permanent),
                Ok(()),
                Ok(())
            ]
        );
        assert_eq!(batches(&h), [vec![0, 1, 2, 3, 4, 5], vec![4, 5]]);
    }

    #[tokio::test(start_paused = true)]
    async fn each_result_goes_to_its_record_and_a_batch_without_outcomes_fails() {
        let h = recording(|call, batch| match call {
            0 => BatchOutcome::each(
                (0..batch.len())
                    .map(|i| {
                        if i == 1 {
                            Err(HandlerError::unavailable("down"))
                        } else {
                            Ok(())
                        }
                    })
                    .collect(),
            ),
            _ => BatchOutcome::each(Vec::new()),
        });
        assert_eq!(
            handle_all(&h, 0..3).await,
            [Ok(()), Err(FailureKind::Unavailable), Ok(())]
        );
        assert_eq!(
            handle_all(&h, 3..5).await,
            [Err(FailureKind::Transient), Err(FailureKind::Transient)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_batch_fails_each_record_as_a_panic_and_all_failed_duplicates_the_error() {
        let h = recording(|call, _| match call {
            0 => panic!("bulk client bug"),
            _ => BatchOutcome::all_failed(
                HandlerError::unavailable("503").retry_after(Duration::from_secs(7)),
            ),
        });
        assert_eq!(handle_all(&h, 0..2).await, [Err(FailureKind::Panic); 2]);
        let errors: Vec<_> = {
            let tasks: Vec<_> = (2..4)
                .map(|id| {
                    let h = h.clone();
                    tokio::spawn(async move { h.handle(&message(id)).await.unwrap_err() })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        };
        for e in errors {
            assert_eq!(e.kind(), FailureKind::Unavailable);
            assert_eq!(e.retry_after_hint(), Some(Duration::from_secs(7)));
            assert_eq!(e.message(), "503");
        }
    }

    /// A record given up before its batch is called is left out of it.
    #[tokio::test(start_paused = true)]
    async fn a_record_given_up_before_its_batch_is_left_out() {
        let h = Arc::new(
            Arc::into_inner(recording(|_, _| BatchOutcome::all_ok()))
                .unwrap()
                .linger(Duration::from_millis(50)),
        );
        let given_up = tokio::time::timeout(Duration::from_millis(10), h.handle(&message(0))).await;
        assert!(given_up.is_err(), "still waiting for its batch");
        assert_eq!(handle_all(&h, 1..3).await, [Ok(()), Ok(())]);
        assert_eq!(batches(&h), [vec![1, 2]]);
    }
}
