//! The engine side of transactional output (see [`crate::transactional`]): the producer, the
//! guard under which a record's outputs are produced and the record marked finished, and the
//! commit of one transaction (delivery rule 20 in the crate docs).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, error, warn};

use crate::consumer::schedule::{Hub, Tp};
use crate::dead_letter::kafka::LetterRecord;
use crate::record::RawRecord;
use crate::transactional::{OutputRecord, TransactionalOutput};

/// One partition's commit: offset and metadata (as the non-transactional commit sends).
type Commit = ((Tp, i64), Option<String>);

/// How long an output waits for room in the producer's queue before it fails the transaction.
const QUEUE_FULL_WAIT: Duration = Duration::from_secs(30);

/// What a record produces when it finishes.
#[derive(Debug)]
enum Pending {
    /// The staged outputs of its successful attempt.
    Outputs(Vec<OutputRecord>),
    /// Its dead letter, rendered by the Kafka dead-letter sink: the full letter, then the
    /// fallbacks written when the previous one is too large.
    Letter(Vec<LetterRecord>),
    /// Its forward to a retry tier, rendered by the tiers as they would write it.
    Forward(LetterRecord),
}

/// How many transactions committed, and whether more may: what a claim kept past its
/// record's end waits for (see [`Transactions::committed`]).
#[derive(Debug, Clone, Copy, Default)]
struct Committed {
    count: u64,
    /// No transaction commits any more (they failed, or the consumer stopped).
    over: bool,
}

/// Why the transactions stopped: the consumer stops with it.
#[derive(Debug, Clone)]
pub(crate) struct TransactionFailure {
    pub(crate) operation: &'static str,
    pub(crate) fenced: bool,
    pub(crate) error: KafkaError,
}

/// See the module docs.
pub(crate) struct Transactions {
    producer: ThreadedProducer<DefaultProducerContext>,
    /// Shared by a worker while it produces a record's outputs and marks it finished;
    /// exclusive while the poll thread commits the transaction.
    gate: RwLock<()>,
    /// Staged outputs of records whose last attempt succeeded, dead letters of records
    /// given up and forwards of records sent to a retry tier, by record (the address of the job's record, alive until the job ends),
    /// until the record finishes.
    staged: Mutex<HashMap<usize, Pending>>,
    /// Outputs were produced into the open transaction.
    produced: AtomicBool,
    failure: Mutex<Option<TransactionFailure>>,
    /// `failure` is set.
    stopped: AtomicBool,
    timeout: Duration,
    /// Transactions committed so far: the open one is number `count` (it cannot change
    /// while the shared guard is held).
    committed: tokio::sync::watch::Sender<Committed>,
    /// Claims kept past their record's end until their transaction commits (see
    /// [`Transactions::keep_claim`]).
    kept_claims: Arc<tokio::sync::watch::Sender<usize>>,
}

impl std::fmt::Debug for Transactions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transactions")
            .field("failure", &self.failure())
            .finish_non_exhaustive()
    }
}

fn key_of(record: &RawRecord) -> usize {
    std::ptr::from_ref(record) as usize
}

impl Transactions {
    /// Creates the transactional producer (it connects at [`start`](Self::start)).
    pub(crate) fn new(
        bootstrap: &str,
        security: Vec<(String, String)>,
        output: &TransactionalOutput,
    ) -> Result<Self, KafkaError> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", bootstrap.trim())
            .set("client.id", "kourier-transactional-output")
            .set("partitioner", "murmur2_random")
            .set(
                "transaction.timeout.ms",
                output.transaction_timeout.as_millis().to_string(),
            );
        for (k, v) in security.iter().chain(&output.producer_config) {
            config.set(k, v);
        }
        config
            .set("transactional.id", &output.transactional_id)
            .set("enable.idempotence", "true")
            .set("acks", "all");
        Ok(Transactions {
            producer: config.create()?,
            gate: RwLock::new(()),
            staged: Mutex::new(HashMap::new()),
            produced: AtomicBool::new(false),
            failure: Mutex::new(None),
            stopped: AtomicBool::new(false),
            timeout: output.operation_timeout,
            committed: tokio::sync::watch::Sender::new(Committed::default()),
            kept_claims: Arc::new(tokio::sync::watch::Sender::new(0)),
        })
    }

    /// Registers with the transaction coordinator (fencing an earlier producer with this id
    /// and aborting what it left open) and begins the first transaction.
    pub(crate) fn start(&self) -> Result<(), TransactionFailure> {
        let fail = |operation, error| self.fail(operation, error);
        self.producer
            .init_transactions(self.timeout)
            .map_err(|e| fail("init transactions", e))?;
        self.producer
            .begin_transaction()
            .map_err(|e| fail("begin transaction", e))
    }

    /// Why the transactions stopped, if they did.
    pub(crate) fn failure(&self) -> Option<TransactionFailure> {
        self.failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn fail(&self, operation: &'static str, error: KafkaError) -> TransactionFailure {
        let fenced = is_fenced(&error);
        let failure = TransactionFailure {
            operation,
            fenced,
            error,
        };
        let mut slot = self.failure.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            error!(operation, fenced, error = %failure.error, "transaction failed: the consumer stops; nothing more is committed (a restart handles the uncommitted records again, their outputs were not committed)");
            *slot = Some(failure.clone());
            self.stopped.store(true, Ordering::SeqCst);
            self.committed.send_modify(|c| c.over = true);
        }
        failure
    }

    /// No transaction commits any more: the poll thread is done (the final commit made or
    /// failed). Claims still waiting for a transaction are released.
    pub(crate) fn close(&self) {
        self.committed.send_modify(|c| c.over = true);
    }

    /// Whether transaction number `transaction` (as [`produce_staged`](Self::produce_staged)
    /// answered) committed: waits until it did (`true`), or until no transaction commits any
    /// more (`false`: it failed, was aborted, or the consumer stopped first).
    pub(crate) async fn committed(&self, transaction: u64) -> bool {
        let mut committed = self.committed.subscribe();
        committed
            .wait_for(|c| c.count > transaction || c.over)
            .await
            .is_ok_and(|c| c.count > transaction)
    }

    /// What a commit tells the claims waiting for it, without a broker (unit tests).
    #[cfg(test)]
    pub(crate) fn committed_without_broker(&self) {
        self.committed.send_modify(|c| c.count += 1);
    }

    /// Counts a claim kept past its record's end until its transaction commits, until the
    /// returned guard is dropped: the consumer's `run` waits for such claims before it
    /// returns ([`claims_settled`](Self::claims_settled)).
    pub(crate) fn keep_claim(&self) -> KeptClaim {
        self.kept_claims.send_modify(|n| *n += 1);
        KeptClaim(self.kept_claims.clone())
    }

    /// Waits (at most `limit`) until no claim kept past its record's end is left: each was
    /// marked done, or released. Called after [`close`](Self::close).
    pub(crate) async fn claims_settled(&self, limit: Duration) {
        let mut kept = self.kept_claims.subscribe();
        if tokio::time::timeout(limit, kept.wait_for(|n| *n == 0))
            .await
            .is_err()
        {
            warn!(
                claims = *kept.borrow(),
                "claims kept until their transaction committed still unsettled at the end of the run: they run out with their lease"
            );
        }
    }

    /// Keeps the outputs the successful attempt of `record` staged, until it finishes.
    pub(crate) fn stage(&self, record: &RawRecord, outputs: Vec<OutputRecord>) {
        let mut staged = self.staged.lock().unwrap_or_else(PoisonError::into_inner);
        if outputs.is_empty() {
            staged.remove(&key_of(record));
        } else {
            staged.insert(key_of(record), Pending::Outputs(outputs));
        }
    }

    /// Keeps the dead letter of `record` (the records the Kafka sink would write, full letter
    /// first), until it finishes: it is written in the transaction that commits its offset.
    pub(crate) fn stage_letter(&self, record: &RawRecord, letter: Vec<LetterRecord>) {
        let mut staged = self.staged.lock().unwrap_or_else(PoisonError::into_inner);
        staged.insert(key_of(record), Pending::Letter(letter));
    }

    /// Keeps the forward of `record` to a retry tier (the record the tiers would write),
    /// until it finishes: it is written in the transaction that commits its offset.
    pub(crate) fn stage_forward(&self, record: &RawRecord, forward: LetterRecord) {
        let mut staged = self.staged.lock().unwrap_or_else(PoisonError::into_inner);
        staged.insert(key_of(record), Pending::Forward(forward));
    }

    /// Held while a record's outputs are produced and it is marked finished.
    pub(crate) fn shared(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Called under [`shared`](Self::shared) as `record` ends: produces its staged outputs,
    /// its dead letter or its retry-tier forward into the open transaction when it `finishes`
    /// (settled, in its current assignment), drops them otherwise. Answers the number of the
    /// transaction the record finished in (`None`: it did not, or the transactions stopped),
    /// for [`committed`](Self::committed).
    pub(crate) fn produce_staged(&self, record: &RawRecord, finishes: bool) -> Option<u64> {
        // After a failure nothing more is committed: outputs would only fail again.
        let finished_in = (finishes && !self.stopped.load(Ordering::SeqCst))
            .then(|| self.committed.borrow().count);
        let pending = {
            let mut staged = self.staged.lock().unwrap_or_else(PoisonError::into_inner);
            if staged.is_empty() {
                return finished_in;
            }
            staged.remove(&key_of(record))
        };
        let Some(pending) = pending.filter(|_| finished_in.is_some()) else {
            return finished_in;
        };
        self.send_pending(record, pending);
        finished_in
    }

    fn send_pending(&self, record: &RawRecord, pending: Pending) {
        self.produced.store(true, Ordering::SeqCst);
        let outputs = match pending {
            Pending::Outputs(outputs) => outputs,
            Pending::Letter(letter) => return self.produce_letter(record, letter),
            Pending::Forward(forward) => {
                if let Err(e) = self.send_record(forward.base_record()) {
                    warn!(coordinates = %record.coordinates(), tier_topic = forward.topic, error = %e, "retry-tier forward refused by the transactional producer: the transaction fails");
                    self.fail("produce a retry-tier forward", e);
                }
                return;
            }
        };
        for output in &outputs {
            if let Err(e) = self.send(output) {
                warn!(coordinates = %record.coordinates(), topic = output.topic, error = %e, "output record refused: the transaction fails");
                self.fail("produce an output record", e);
                return;
            }
        }
    }

    /// Produces the dead letter of `record`: its first record that the producer takes (a
    /// record above the producer's `message.max.bytes` is refused at once, and the next,
    /// smaller, fallback is tried, as the sink does when the broker refuses one).
    fn produce_letter(&self, record: &RawRecord, letter: Vec<LetterRecord>) {
        let mut last = None;
        for (n, fallback) in letter.iter().enumerate() {
            match self.send_record(fallback.base_record()) {
                Ok(()) => {
                    if n > 0 {
                        warn!(coordinates = %record.coordinates(), dead_letter_topic = fallback.topic, fallbacks = n, "dead letter too large for the transactional producer; written without its value (or as provenance only)");
                    }
                    return;
                }
                Err(KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge)) => {
                    last = Some(KafkaError::MessageProduction(
                        RDKafkaErrorCode::MessageSizeTooLarge,
                    ));
                }
                Err(e) => {
                    last = Some(e);
                    break;
                }
            }
        }
        let e = last.unwrap_or(KafkaError::MessageProduction(RDKafkaErrorCode::Fail));
        warn!(coordinates = %record.coordinates(), error = %e, "dead letter refused by the transactional producer: the transaction fails");
        self.fail("produce a dead letter", e);
    }

    fn send(&self, output: &OutputRecord) -> Result<(), KafkaError> {
        let mut headers = rdkafka::message::OwnedHeaders::new_with_capacity(output.headers.len());
        for (name, value) in &output.headers {
            headers = headers.insert(rdkafka::message::Header {
                key: name,
                value: Some(value),
            });
        }
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(&output.topic).headers(headers);
        if let Some(key) = &output.key {
            record = record.key(key.as_slice());
        }
        if let Some(value) = &output.value {
            record = record.payload(value.as_slice());
        }
        if let Some(partition) = output.partition {
            record = record.partition(partition);
        }
        self.send_record(record)
    }

    /// Hands `record` to the producer, waiting (a bounded while) for room in its queue.
    fn send_record(&self, mut record: BaseRecord<'_, [u8], [u8]>) -> Result<(), KafkaError> {
        let started = Instant::now();
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r))
                    if started.elapsed() < QUEUE_FULL_WAIT =>
                {
                    record = r;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    /// Commits the open transaction: `extra` (a revoke's partitions, taken out of the
    /// scheduler already) and every partition whose commit moved, with their metadata, sent
    /// to the transaction with the consumer's group metadata; then begins the next one.
    /// Returns what was committed. On failure the transaction is aborted where it can be and
    /// the transactions stop for good ([`failure`](Self::failure)); a retriable error (a
    /// timeout) leaves it open, for the next interval.
    pub(crate) fn commit(
        &self,
        hub: &Hub,
        group: Option<ConsumerGroupMetadata>,
        extra: &[Commit],
        why: &str,
    ) -> Result<Vec<(Tp, i64)>, TransactionFailure> {
        if let Some(failure) = self.failure() {
            return Err(failure);
        }
        // No record finishes (produces its outputs, moves its offset) from here on until the
        // transaction committed: what is sent below is exactly what produced into it.
        let _exclusive = self.gate.write().unwrap_or_else(PoisonError::into_inner);
        let mut commits: Vec<Commit> = {
            let mut s = hub.lock();
            let due = s.commits_due();
            (due.into_iter())
                .map(|(tp, o)| {
                    let m = s.commit_metadata(&tp, o);
                    ((tp, o), m)
                })
                .collect()
        };
        for c in extra {
            if !commits.iter().any(|((tp, _), _)| *tp == c.0.0) {
                commits.push(c.clone());
            }
        }
        let produced = self.produced.load(Ordering::SeqCst);
        if commits.is_empty() {
            if !produced {
                return Ok(Vec::new());
            }
            // Outputs without an offset to commit with them: their records' partitions left
            // without a commit. Committing them would duplicate what the next owner produces.
            return Err(self.abort_and_fail(
                "commit transaction",
                KafkaError::ConsumerCommit(RDKafkaErrorCode::AssignmentLost),
            ));
        }
        let started = Instant::now();
        if !commits.is_empty() {
            let Some(group) = group else {
                // Not in a group (yet, or any more): the offsets cannot be fenced.
                return Err(self.fail(
                    "send offsets to the transaction",
                    KafkaError::ConsumerCommit(RDKafkaErrorCode::State),
                ));
            };
            let mut tpl = TopicPartitionList::with_capacity(commits.len());
            for (((t, p), o), m) in &commits {
                tpl.add_partition_offset(t, *p, Offset::Offset(*o))
                    .map_err(|e| self.fail("send offsets to the transaction", e))?;
                if let (Some(m), Some(mut e)) = (m, tpl.find_partition(t, *p)) {
                    e.set_metadata(m.as_str());
                }
            }
            if let Err(e) = self
                .producer
                .send_offsets_to_transaction(&tpl, &group, self.timeout)
            {
                return Err(self.failed("send offsets to the transaction", e, !extra.is_empty()));
            }
        }
        if let Err(e) = self.producer.commit_transaction(self.timeout) {
            return Err(self.failed("commit transaction", e, !extra.is_empty()));
        }
        self.produced.store(false, Ordering::SeqCst);
        self.committed.send_modify(|c| c.count += 1);
        let offsets: Vec<(Tp, i64)> = commits.into_iter().map(|(o, _)| o).collect();
        hub.lock().committed(&offsets);
        hub.metrics.commit(started.elapsed(), true);
        debug!(why, partitions = offsets.len(), took = ?started.elapsed(), "transaction committed");
        self.producer
            .begin_transaction()
            .map_err(|e| self.fail("begin transaction", e))?;
        Ok(offsets)
    }

    /// The consumer's assignment was lost (it was away past its session timeout: another
    /// member may own its partitions already): the open transaction, whose outputs' records
    /// may be handled by the new owner, is aborted, and the transactions stop (a zombie).
    pub(crate) fn assignment_lost(&self) {
        self.stop("keep the assignment", RDKafkaErrorCode::AssignmentLost);
    }

    /// A partition was reset to its commit point (a panic escaped a worker): the records
    /// finished above it would be handled again and their outputs produced twice, so the
    /// transactions stop instead (after the reset's own commit).
    pub(crate) fn partition_reset(&self) {
        self.stop("reset a partition", RDKafkaErrorCode::State);
    }

    /// Aborts the open transaction and stops the transactions.
    fn stop(&self, operation: &'static str, code: RDKafkaErrorCode) {
        if self.failure().is_some() {
            return;
        }
        let _exclusive = self.gate.write().unwrap_or_else(PoisonError::into_inner);
        self.abort_and_fail(operation, KafkaError::ConsumerCommit(code));
    }

    fn abort_and_fail(&self, operation: &'static str, e: KafkaError) -> TransactionFailure {
        let failure = self.fail(operation, e);
        if let Err(e) = self.producer.abort_transaction(self.timeout) {
            error!(error = %e, "aborting the transaction failed (the broker aborts it when its timeout passes)");
        }
        failure
    }

    /// A transactional operation failed: a retriable error leaves the transaction open (the
    /// next commit tries again); else it is aborted if it must be, and the transactions stop.
    fn failed(&self, operation: &'static str, e: KafkaError, revoke: bool) -> TransactionFailure {
        let (retriable, abort) = match &e {
            KafkaError::Transaction(t) => (t.is_retriable(), t.txn_requires_abort()),
            _ => (false, false),
        };
        if revoke {
            // The revoked partitions are gone from the scheduler: a later transaction would
            // carry their records' outputs without their offsets.
            return self.abort_and_fail(operation, e);
        }
        if retriable {
            warn!(operation, error = %e, "transactional operation failed; retrying at the next commit");
            return TransactionFailure {
                operation,
                fenced: false,
                error: e,
            };
        }
        if abort {
            self.abort_and_fail(operation, e)
        } else {
            self.fail(operation, e)
        }
    }
}

/// A claim kept past its record's end, counted until dropped (see
/// [`Transactions::keep_claim`]).
#[derive(Debug)]
pub(crate) struct KeptClaim(Arc<tokio::sync::watch::Sender<usize>>);

impl Drop for KeptClaim {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Whether `e` says another producer (or the group) has taken over: a zombie.
fn is_fenced(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::Fenced
                | RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::InvalidProducerEpoch
                | RDKafkaErrorCode::IllegalGeneration
                | RDKafkaErrorCode::UnknownMemberId
                | RDKafkaErrorCode::FencedInstanceId
                | RDKafkaErrorCode::RebalanceInProgress
                | RDKafkaErrorCode::AssignmentLost
        )
    )
}

impl From<TransactionFailure> for crate::error::Error {
    fn from(f: TransactionFailure) -> Self {
        crate::error::Error::Transaction {
            operation: f.operation,
            fenced: f.fenced,
            source: f.error,
        }
    }
}
