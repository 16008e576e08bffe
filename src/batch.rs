//! Handlers that take many records in one call (a bulk insert, a bulk mail or push API, a
//! search-index batch): [`BatchHandler`] and the [`batched`] adapter that makes one a
//! [`Handler`].
//!
//! # How records are gathered
//!
//! The consumer still runs records one by one — its lanes, retries, dead letters, idempotency
//! claims, breakers and outcome observer all work per record, as for any handler. The
//! adapter gathers the records whose attempts are running at the same moment into a batch,
//! each followed by the records queued next in its lane ([records taken
//! ahead](#records-taken-ahead)): a batch is called when it holds
//! [`max_records`](Batched::max_records) records or [`max_bytes`](Batched::max_bytes) bytes
//! of keys and values, or when its first record has waited [`linger`](Batched::linger)
//! (default 100 records, 1 MiB, 5 ms), with at most
//! [`max_concurrent_batches`](Batched::max_concurrent_batches) calls at once (default 4;
//! while they are all busy, records gather into the next batch).
//!
//! The consumer's ordering decides which records run at once: in
//! [`Unordered`](crate::ProcessingOrder::Unordered) order up to
//! [`max_in_flight`](crate::RetryingConsumerBuilder::max_in_flight); in
//! [`Key`](crate::ProcessingOrder::Key) order one record per key, in
//! [`Partition`](crate::ProcessingOrder::Partition) order one per partition. In the ordered
//! modes each of them brings its lane's next records, so a batch holds a run of each lane:
//! a batch per partition in `Partition` order, a run per key in `Key` order.
//!
//! A batch is laid out lane by lane: a record whose turn it is, then its lane's records
//! taken ahead, in offset order, then the next lane's. The records whose turn it is come
//! first within the limits (they never wait for records taken ahead); records taken ahead
//! fill what is left, and a lane's run is cut where the limits are reached (the rest are
//! taken at a later turn).
//!
//! # Records taken ahead
//!
//! When the consumer runs a record (its *turn*), the adapter asks it for the records queued
//! next in the record's lane (at most `max_records - 1`, up to the first that cannot be
//! decoded: that one is dead-lettered at its turn) and puts them in the record's batch. Their
//! results are kept by the adapter: when the consumer later runs one of them in its turn,
//! the adapter answers at once with its kept success (no batch, no wait). Only successes are
//! kept, and only those before their lane's first failure or first record not attempted in
//! that batch; every other record of the run is handled again at its turn, **after** the
//! record before it has its outcome (a retry, a dead letter), so the order of effects within
//! a lane holds: with [`BatchOutcome::failed_at`] nothing after the failure ran; with
//! [`BatchOutcome::each`] a later record that succeeded after a failed one runs again after
//! the failed one's retry (once more: at-least-once). Kept results are bounded (four times
//! what the batches running at once hold): past that the oldest is dropped, and its record is
//! simply handled again at its turn; a kept success of a key below its lane's current offset
//! (its turn passed: a revoke, a restart) is dropped.
//!
//! With an [idempotency store](crate::RetryingConsumerBuilder::idempotency) a record's effect
//! must run under its claim, so the consumer offers only the records whose claims it holds
//! already: when a record of an ordered lane claims its key, the same store call claims the
//! keys of the lane's next records (up to 32), and the run offered is the prefix of those
//! whose claims were acquired (a record whose key is done — a duplicate, skipped at its
//! turn —, busy, not claimed yet or claimed too long ago ends the run: it runs at its turn).
//! Their claims hold while the batch runs (renewed, never released meanwhile; each message
//! carries its claim's token, as [`Message::claim_token`] says), and each record takes its
//! claim at its turn and has its key marked done there. A run is then at most 33 records of a
//! lane (with its lead), and the claims of the next run are fetched when its first record
//! claims. A record taken ahead whose turn never comes in this consumer (a revoke, a shutdown
//! in between) ran but is not marked done: it runs again where it is delivered next
//! (at-least-once, as any record whose effect ran before its completion was written).
//!
//! The consumer offers no records ahead — a batch then holds one record per lane, as
//! [`look_ahead(false)`](Batched::look_ahead) does — where running a record before its turn
//! would skip a step of that turn: with
//! [transactional output](crate::RetryingConsumerBuilder::transactional) (its
//! outputs belong to its own transaction), with
//! [destinations](crate::RetryingConsumerBuilder::destinations) (it would skip its
//! destination's breaker), with retry tiers that keep key order (the ledger may send it to a
//! tier instead) or for a record read from a tier topic (it waits for its due time), for the
//! [breaker](crate::BreakerPolicy)'s probe (one record only), and while a partition drains
//! (a revoke, a shutdown). [`Unordered`](crate::ProcessingOrder::Unordered) order has no
//! lanes to take from.
//!
//! A record taken ahead is not told to the consumer until its turn: its attempt, its
//! [`handler_timeout`](crate::RetryingConsumerBuilder::handler_timeout), the
//! [outcome observer](crate::RetryingConsumerBuilder::on_outcome) and the metrics (a handler
//! duration of about zero) belong to its turn, which ends at once. A failure of a record taken
//! ahead is not counted anywhere (not by the breaker, not as an attempt): the record meets
//! it again at its turn, where it counts.
//!
//! # Outcomes
//!
//! [`BatchHandler::handle_batch`] answers with a [`BatchOutcome`]: every record handled,
//! one result per record, a failure at index `n` (the records before it handled, the rest
//! **not attempted**), or one failure for all. A record whose turn it is and that was not
//! attempted goes into the next batch without using an attempt; a failed record takes its
//! own path (its retry policy, its dead letter, its breaker) exactly as if a single-record
//! handler had returned that error, and a retried one joins a later batch. A batch call that
//! panics fails each of its records as a panic. A batch that gives no outcome to any of its
//! records (an empty [`BatchOutcome::each`]) fails them as transient, so a handler cannot
//! loop a batch forever.
//!
//! With a [`handler_timeout`](crate::RetryingConsumerBuilder::handler_timeout), a record's
//! attempt includes its wait for its batch; a record given up (a timeout, a revoke, the
//! shutdown deadline) before its batch was called is left out of it (with its records taken
//! ahead), and one given up after lets the call run to its end (its result is dropped; the
//! record is delivered again, and its records taken ahead keep their results).

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Notify, Semaphore, oneshot};

use crate::clock;
use crate::guard::guarded_async;
use crate::handler::{Handler, HandlerError, sealed::Lane};
use crate::message::Message;
use crate::record::RawRecord;

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

    /// Handles one batch (at least one record; each record's run of its lane's next records
    /// follows it, in order — see the [module docs](self)): one attempt of each record.
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
/// limits: 100 records, 1 MiB, a 5 ms linger, 4 batches at once, records taken ahead.
pub fn batched<B: BatchHandler>(handler: B) -> Batched<B> {
    Batched {
        handler: Arc::new(handler),
        limits: Limits {
            max_records: 100,
            max_bytes: 1 << 20,
            linger: Duration::from_millis(5),
            max_concurrent: 4,
            look_ahead: true,
        },
        shared: Arc::new(Shared {
            queue: Mutex::new(VecDeque::new()),
            ahead: Mutex::new(Ahead::default()),
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
    look_ahead: bool,
}

impl Limits {
    /// How many results of records taken ahead are kept at most: four times what the batches
    /// running at once can hold. Past it the oldest is dropped (its record is simply handled
    /// again at its turn).
    fn kept(self) -> usize {
        self.max_records
            .saturating_mul(self.max_concurrent)
            .saturating_mul(4)
    }
}

/// A record waiting for its batch, the records of its lane taken ahead with it, and where
/// its result goes.
struct Pending<T> {
    message: Message<T>,
    bytes: usize,
    /// Its lane's next records, in order, with their sizes.
    ahead: Vec<(Message<T>, usize)>,
    result: oneshot::Sender<Result<(), HandlerError>>,
}

struct Shared<T> {
    queue: Mutex<VecDeque<Pending<T>>>,
    ahead: Mutex<Ahead>,
    /// A record came, or records came back.
    wake: Notify,
    /// The adapter was dropped: the collector stops.
    closed: AtomicBool,
}

impl<T> Shared<T> {
    fn queue(&self) -> MutexGuard<'_, VecDeque<Pending<T>>> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn ahead(&self) -> MutexGuard<'_, Ahead> {
        self.ahead.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Where a record is: its topic, partition and offset.
type Coordinates = (Arc<str>, i32, i64);

fn coordinates_of(raw: &RawRecord) -> Coordinates {
    (raw.topic.clone(), raw.partition, raw.offset)
}

fn key_hash(raw: &RawRecord) -> u64 {
    let mut h = DefaultHasher::new();
    raw.key.as_deref().hash(&mut h);
    h.finish()
}

fn bytes_of(raw: &RawRecord) -> usize {
    raw.key.as_ref().map_or(0, |k| k.len()) + raw.value.as_ref().map_or(0, |v| v.len())
}

/// The records run ahead of their turn: those in a batch not ended yet, and the successes
/// kept for their turn.
#[derive(Debug, Default)]
struct Ahead {
    /// Successes by partition: offset → a hash of the record's key.
    kept: HashMap<(Arc<str>, i32), BTreeMap<i64, u64>>,
    /// How many successes are kept.
    len: usize,
    /// The successes in the order they were kept (the oldest is evicted first); entries
    /// taken or dropped since are skipped when met.
    order: VecDeque<Coordinates>,
    /// Records in a batch that has not ended.
    running: HashSet<Coordinates>,
}

impl Ahead {
    /// Whether `raw` was handled ahead of its turn: its kept success is taken. Kept
    /// successes of its key below its offset are dropped first: their turn has passed (a
    /// revoke, a restart), so they would never be taken.
    fn take(&mut self, raw: &RawRecord) -> bool {
        let tp = (raw.topic.clone(), raw.partition);
        let Some(offsets) = self.kept.get_mut(&tp) else {
            return false;
        };
        let key = key_hash(raw);
        let stale: Vec<i64> = offsets
            .range(..raw.offset)
            .filter(|(_, k)| **k == key)
            .map(|(offset, _)| *offset)
            .collect();
        for offset in &stale {
            offsets.remove(offset);
        }
        let hit = offsets.remove(&raw.offset).is_some();
        if offsets.is_empty() {
            self.kept.remove(&tp);
        }
        self.len -= stale.len() + usize::from(hit);
        hit
    }

    /// Whether the record at `at` runs in a batch or was handled already.
    fn taken(&self, at: &Coordinates) -> bool {
        self.running.contains(at)
            || self
                .kept
                .get(&(at.0.clone(), at.1))
                .is_some_and(|offsets| offsets.contains_key(&at.2))
    }

    /// The record's batch ended; its success is kept when `ok` (at most `limit` are).
    fn ended(&mut self, raw: &RawRecord, ok: bool, limit: usize) {
        let at = coordinates_of(raw);
        self.running.remove(&at);
        if !ok {
            return;
        }
        let offsets = self.kept.entry((at.0.clone(), at.1)).or_default();
        if offsets.insert(at.2, key_hash(raw)).is_none() {
            self.len += 1;
        }
        self.order.push_back(at);
        while self.len > limit {
            let Some((topic, partition, offset)) = self.order.pop_front() else {
                break;
            };
            let tp = (topic, partition);
            if let Some(offsets) = self.kept.get_mut(&tp) {
                if offsets.remove(&offset).is_some() {
                    self.len -= 1;
                }
                if offsets.is_empty() {
                    self.kept.remove(&tp);
                }
            }
        }
        if self.order.len() > limit.saturating_mul(2) {
            // Entries taken at their turn leave their place in the order behind.
            let kept = &self.kept;
            self.order.retain(|(topic, partition, offset)| {
                kept.get(&(topic.clone(), *partition))
                    .is_some_and(|offsets| offsets.contains_key(offset))
            });
        }
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

    /// Whether a record's batch takes the records queued next in its lane, ahead of their
    /// turn (default `true`; see [the module docs](self#records-taken-ahead)). `false`
    /// gathers only the records running at once, one per lane.
    #[must_use]
    pub fn look_ahead(mut self, on: bool) -> Self {
        self.limits.look_ahead = on;
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

    /// The records queued next in the lead's lane, up to the batch's limit: those before the
    /// first that is running in a batch or was handled already (its successors are then
    /// taken at a later turn), marked running.
    fn take_ahead(&self, lane: &Lane<'_, B::Event>) -> Vec<(Message<B::Event>, usize)> {
        if !self.limits.look_ahead {
            return Vec::new();
        }
        let next = lane.ahead(self.limits.max_records - 1);
        if next.is_empty() {
            return Vec::new();
        }
        let mut ahead = self.shared.ahead();
        let mut taken = Vec::with_capacity(next.len());
        for message in next {
            let at = coordinates_of(message.raw());
            if ahead.taken(&at) {
                break;
            }
            ahead.running.insert(at);
            let bytes = bytes_of(message.raw());
            taken.push((message, bytes));
        }
        taken
    }

    /// Queues the record (with its lane's records taken ahead) for its batch and waits for
    /// its result.
    async fn enqueue(
        &self,
        message: &Message<B::Event>,
        ahead: Vec<(Message<B::Event>, usize)>,
    ) -> Result<(), HandlerError> {
        self.start_collector();
        let (tx, rx) = oneshot::channel();
        self.shared.queue().push_back(Pending {
            message: message.clone(),
            bytes: bytes_of(message.raw()),
            ahead,
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
        self.enqueue(message, Vec::new()).await
    }

    fn handle_in_lane<'a>(
        &'a self,
        message: &'a Message<B::Event>,
        lane: Lane<'_, B::Event>,
    ) -> Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send + 'a>> {
        if self.shared.ahead().take(message.raw()) {
            // Handled in an earlier record's batch: its turn ends here.
            return Box::pin(std::future::ready(Ok(())));
        }
        let ahead = self.take_ahead(&lane);
        Box::pin(self.enqueue(message, ahead))
    }
}

/// Whether the queue holds a full batch (records taken ahead included).
fn full<T>(queue: &VecDeque<Pending<T>>, limits: Limits) -> bool {
    let records: usize = queue.iter().map(|p| 1 + p.ahead.len()).sum();
    let bytes: usize = queue
        .iter()
        .map(|p| p.bytes + p.ahead.iter().map(|(_, b)| b).sum::<usize>())
        .sum();
    records >= limits.max_records || bytes >= limits.max_bytes
}

/// Takes the next batch from the front of the queue, leaving out records given up already:
/// first the records whose turn it is (as many as the limits allow), then their records
/// taken ahead, group by group, as far as the limits still allow. Also the records taken
/// ahead that were left out (no longer running).
fn take_batch<T>(
    queue: &mut VecDeque<Pending<T>>,
    limits: Limits,
) -> (Vec<Pending<T>>, Vec<Message<T>>) {
    let mut batch: Vec<Pending<T>> = Vec::new();
    let mut left_out = Vec::new();
    let (mut records, mut bytes) = (0usize, 0usize);
    while let Some(next) = queue.front() {
        if next.result.is_closed() {
            if let Some(given_up) = queue.pop_front() {
                left_out.extend(given_up.ahead.into_iter().map(|(m, _)| m));
            }
            continue;
        }
        if !batch.is_empty()
            && (records >= limits.max_records
                || bytes.saturating_add(next.bytes) > limits.max_bytes)
        {
            break;
        }
        records += 1;
        bytes = bytes.saturating_add(next.bytes);
        batch.extend(queue.pop_front());
    }
    // A record whose turn it is never waits for records taken ahead: they fill what is left.
    for pending in &mut batch {
        let fits = pending
            .ahead
            .iter()
            .take_while(|(_, b)| {
                let fits =
                    records < limits.max_records && bytes.saturating_add(*b) <= limits.max_bytes;
                if fits {
                    records += 1;
                    bytes = bytes.saturating_add(*b);
                }
                fits
            })
            .count();
        left_out.extend(pending.ahead.drain(fits..).map(|(m, _)| m));
    }
    (batch, left_out)
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
        let (batch, left_out) = take_batch(&mut shared.queue(), limits);
        if !left_out.is_empty() {
            let mut ahead = shared.ahead();
            for m in &left_out {
                ahead.ended(m.raw(), false, limits.kept());
            }
        }
        if batch.is_empty() {
            continue;
        }
        let (handler, shared) = (handler.clone(), shared.clone());
        tokio::spawn(async move {
            run_batch(&*handler, &shared, batch, limits).await;
            drop(call);
        });
    }
}

/// Each record's result (`None`: not attempted) from the batch's outcome.
fn results_of(outcome: Outcome, len: usize) -> Vec<Option<Result<(), HandlerError>>> {
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
    results
}

/// Calls the handler with one batch (each record followed by its records taken ahead) and
/// hands each record its result. Successes of records taken ahead are kept for their turn,
/// but only those before their lane's first failure or record not attempted (see the
/// module docs), and before the record whose turn it is learns its result, so that its
/// lane's next turn finds them. Records whose turn it is and that were not attempted go
/// back to the front of the queue, in order, with their records taken ahead.
async fn run_batch<B: BatchHandler>(
    handler: &B,
    shared: &Shared<B::Event>,
    batch: Vec<Pending<B::Event>>,
    limits: Limits,
) {
    let messages: Vec<Message<B::Event>> = batch
        .iter()
        .flat_map(|p| std::iter::once(&p.message).chain(p.ahead.iter().map(|(m, _)| m)))
        .cloned()
        .collect();
    let outcome = match guarded_async(handler.handle_batch(&messages)).await {
        Ok(outcome) => outcome.0,
        Err(panic) => Outcome::AllFailed(HandlerError::panic(format!(
            "batch handler panicked: {panic}"
        ))),
    };
    let mut results = results_of(outcome, messages.len()).into_iter();
    let mut leads = Vec::with_capacity(batch.len());
    {
        let mut ahead = shared.ahead();
        for pending in batch {
            let result = results.next().flatten();
            let mut in_order = matches!(result, Some(Ok(())));
            for (m, _) in &pending.ahead {
                in_order &= matches!(results.next(), Some(Some(Ok(()))));
                ahead.ended(m.raw(), in_order, limits.kept());
            }
            leads.push((pending, result));
        }
    }
    let mut again = Vec::new();
    for (pending, result) in leads {
        match result {
            // The record may have been given up meanwhile: its result is dropped.
            Some(result) => drop(pending.result.send(result)),
            None => again.push(pending),
        }
    }
    if !again.is_empty() {
        let mut queue = shared.queue();
        for mut pending in again.into_iter().rev() {
            // Its records taken ahead were not attempted either (they follow it): they run
            // at their own turn.
            pending.ahead.clear();
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

    /// Record `id`: offset `id` of partition `id / 100`, 10 bytes.
    fn message(id: u32) -> Message<u32> {
        let raw = RawRecord::builder("t")
            .partition(i32::try_from(id / 100).unwrap())
            .offset(i64::from(id))
            .value(vec![0; 10])
            .build();
        Message::new(Arc::new(raw), 1, id)
    }

    /// Handles each `(id, lane)` at once through `h`, record `id` told that its lane's next
    /// records are `lane`: each record's result, in order.
    async fn handle_in_lanes<B: BatchHandler<Event = u32>>(
        h: &Arc<Batched<B>>,
        leads: impl IntoIterator<Item = (u32, Vec<u32>)>,
    ) -> Vec<Result<(), FailureKind>> {
        let tasks: Vec<_> = leads
            .into_iter()
            .map(|(id, lane)| {
                let h = h.clone();
                tokio::spawn(async move {
                    let ahead = move |max: usize| -> Vec<Message<u32>> {
                        lane.iter().take(max).map(|id| message(*id)).collect()
                    };
                    let m = message(id);
                    h.handle_in_lane(&m, Lane::new(&ahead))
                        .await
                        .map_err(|e| e.kind())
                })
            })
            .collect();
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.unwrap());
        }
        results
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

    /// Each record brings its lane's next records; they follow it in its batch, and their
    /// turns end at once with the batch's results (no batch, no wait).
    #[tokio::test(start_paused = true)]
    async fn a_records_lane_follows_it_and_the_lanes_turns_end_at_once() {
        let h = recording(|_, _| BatchOutcome::all_ok());
        let results = handle_in_lanes(&h, [(0, vec![1, 2, 3]), (100, vec![101, 102])]).await;
        assert_eq!(results, [Ok(()); 2]);
        assert_eq!(batches(&h), [vec![0, 1, 2, 3, 100, 101, 102]]);
        let turns = handle_in_lanes(&h, [(1, vec![2, 3]), (101, vec![102])]).await;
        assert_eq!(turns, [Ok(()); 2]);
        let turns = handle_in_lanes(&h, [(2, vec![3]), (102, vec![])]).await;
        assert_eq!(turns, [Ok(()); 2]);
        assert_eq!(handle_in_lanes(&h, [(3, vec![4])]).await, [Ok(())]);
        assert_eq!(
            batches(&h).len(),
            1,
            "the turns of records handled ahead call nothing"
        );
        assert_eq!(handle_in_lanes(&h, [(4, vec![])]).await, [Ok(())]);
        assert_eq!(batches(&h), [vec![0, 1, 2, 3, 100, 101, 102], vec![4]]);
    }

    /// Records whose turn it is come first; the limits cut a lane's run (in records and in
    /// bytes), and what is cut is taken at a later turn.
    #[tokio::test(start_paused = true)]
    async fn limits_cut_a_lanes_run_after_the_records_whose_turn_it_is() {
        let h = Arc::new(
            Arc::into_inner(recording(|_, _| BatchOutcome::all_ok()))
                .unwrap()
                .max_records(4),
        );
        let results = handle_in_lanes(&h, [(0, vec![1, 2, 3, 4, 5]), (100, vec![101])]).await;
        assert_eq!(results, [Ok(()); 2]);
        assert_eq!(batches(&h), [vec![0, 1, 2, 100]]);
        for turn in [(1, vec![2, 3, 4, 5]), (2, vec![3, 4, 5])] {
            assert_eq!(handle_in_lanes(&h, [turn]).await, [Ok(())]);
        }
        assert_eq!(handle_in_lanes(&h, [(3, vec![4, 5])]).await, [Ok(())]);
        assert_eq!(batches(&h), [vec![0, 1, 2, 100], vec![3, 4, 5]]);

        // 10 bytes a record: 25 bytes hold two.
        let h = Arc::new(
            Arc::into_inner(recording(|_, _| BatchOutcome::all_ok()))
                .unwrap()
                .max_bytes(25),
        );
        assert_eq!(handle_in_lanes(&h, [(0, vec![1, 2, 3])]).await, [Ok(())]);
        assert_eq!(batches(&h), [vec![0, 1]]);
    }

    /// Only successes before their lane's first failure are kept: the records after a failed
    /// one run again at their turn, after it.
    #[tokio::test(start_paused = true)]
    async fn only_successes_before_a_lanes_first_failure_are_kept() {
        let h = recording(|call, batch| {
            let ids: Vec<u32> = batch.iter().map(|m| *m.event()).collect();
            match call {
                0 => BatchOutcome::each(
                    ids.iter()
                        .map(|id| match id {
                            2 | 100 => Err(HandlerError::transient("refused")),
                            _ => Ok(()),
                        })
                        .collect(),
                ),
                _ => BatchOutcome::all_ok(),
            }
        });
        let results = handle_in_lanes(&h, [(0, vec![1, 2, 3]), (100, vec![101])]).await;
        assert_eq!(results, [Ok(()), Err(FailureKind::Transient)]);
        assert_eq!(batches(&h), [vec![0, 1, 2, 3, 100, 101]]);
        // 1 was kept; 2 failed; 3 succeeded after 2's failure: not kept.
        assert_eq!(handle_in_lanes(&h, [(1, vec![2, 3])]).await, [Ok(())]);
        assert_eq!(batches(&h).len(), 1);
        assert_eq!(handle_in_lanes(&h, [(2, vec![3])]).await, [Ok(())]);
        // 100 failed: 101 (after it) runs again after 100's retry.
        assert_eq!(handle_in_lanes(&h, [(100, vec![101])]).await, [Ok(())]);
        assert_eq!(
            batches(&h),
            [vec![0, 1, 2, 3, 100, 101], vec![2, 3], vec![100, 101]]
        );
    }

    /// `failed_at`: the records after the failure were not attempted; a record whose turn it
    /// is goes to the next batch, the records taken ahead are left for their turn.
    #[tokio::test(start_paused = true)]
    async fn a_failure_at_an_index_keeps_only_the_successes_before_it() {
        let h = recording(|call, _| match call {
            0 => BatchOutcome::failed_at(2, HandlerError::permanent("row 2 is bad")),
            _ => BatchOutcome::all_ok(),
        });
        let results = handle_in_lanes(&h, [(0, vec![1, 2, 3]), (100, vec![101])]).await;
        assert_eq!(results, [Ok(()), Ok(())]);
        assert_eq!(batches(&h), [vec![0, 1, 2, 3, 100, 101], vec![100]]);
        assert_eq!(handle_in_lanes(&h, [(1, vec![2, 3])]).await, [Ok(())]);
        assert_eq!(batches(&h).len(), 2, "1 was kept");
        assert_eq!(handle_in_lanes(&h, [(101, vec![])]).await, [Ok(())]);
        assert_eq!(
            batches(&h).len(),
            3,
            "101 was not attempted: it runs at its turn"
        );
    }

    /// A record running in a batch is not taken ahead again (a record given up while its
    /// batch runs is tried again meanwhile).
    #[tokio::test(start_paused = true)]
    async fn records_running_in_a_batch_are_not_taken_again() {
        let h = Arc::new(
            Arc::into_inner(recording(|_, _| BatchOutcome::all_ok()))
                .unwrap()
                .linger(Duration::ZERO),
        );
        let given_up = tokio::time::timeout(
            Duration::from_millis(5),
            handle_in_lanes(&h, [(0, vec![1, 2])]),
        )
        .await;
        assert!(given_up.is_err(), "its batch takes 10 ms");
        assert_eq!(handle_in_lanes(&h, [(0, vec![1, 2])]).await, [Ok(())]);
        assert_eq!(batches(&h), [vec![0, 1, 2], vec![0]]);
    }

    fn keyed(offset: i64, key: &str) -> RawRecord {
        RawRecord::builder("t").offset(offset).key(key).build()
    }

    /// At most `limit` successes are kept (the oldest goes first); a record's turn drops its
    /// key's kept successes below its offset.
    #[test]
    fn kept_successes_are_bounded_and_those_whose_turn_passed_are_dropped() {
        let mut ahead = Ahead::default();
        for offset in 0..5 {
            ahead.ended(&keyed(offset, "a"), true, 3);
        }
        assert_eq!(ahead.len, 3);
        assert!(!ahead.take(&keyed(1, "b")), "evicted");
        assert!(ahead.take(&keyed(2, "b")));

        let mut ahead = Ahead::default();
        for (offset, key) in [(5, "a"), (6, "a"), (7, "b"), (9, "a")] {
            ahead.ended(&keyed(offset, key), true, 100);
        }
        assert!(!ahead.take(&keyed(8, "a")), "8 was not kept");
        assert_eq!(ahead.len, 2, "a's 5 and 6 were dropped");
        assert!(!ahead.take(&keyed(6, "a")));
        assert!(
            ahead.take(&keyed(7, "b")),
            "another key's turn keeps its own"
        );
        assert!(ahead.take(&keyed(9, "a")));
        assert_eq!(ahead.len, 0);
        assert!(ahead.kept.is_empty());
    }
}
