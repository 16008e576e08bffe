//! How a record waits without holding what others need: its in-flight slot ([`Slot`]),
//! given up while it waits out a back-off, an outage or a busy claim ([`back_off`]), and the
//! infrastructure waits that end at a drain or only when the record is given up
//! ([`InfraWait`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::consumer::dedup::HeldClaim;
use crate::consumer::stop::Stop;
use crate::consumer::transaction::KeptClaim;
use crate::record::RawRecord;
use crate::retry::infra_backoff;

/// Back-off for infrastructure waits (store outage, busy claims, dead-letter writes):
/// 100 ms doubling to 5 s, with jitter.
pub(crate) fn infra_delay(failures: u32) -> Duration {
    infra_backoff(Duration::from_millis(100), Duration::from_secs(5), failures)
}

/// Sleeps unless cancelled first; returns whether the full delay passed.
pub(crate) async fn sleep_or_cancel(delay: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(delay) => true,
        () = cancel.cancelled() => false,
    }
}

/// The worker's in-flight slot, which a record gives up while it waits out a retry back-off
/// (its lane stays taken: nothing of its key or partition overtakes it).
pub(crate) trait Slot: Send + Sync {
    /// Gives the slot up; the freed slot's next job starts on a new worker.
    fn park(&self);
    /// Takes a slot back: `Ok` at once, or a receiver that fires when one is handed over.
    fn resume(&self) -> Result<(), oneshot::Receiver<()>>;
    /// Takes the slot back at once, over the limit if need be (unless one was handed over
    /// already): the record is being given up while it waits.
    fn resume_now(&self);
    /// The record's outcome is decided and only needs writing down (marking its key done,
    /// its dead letter's acknowledgement): its slot and lane are freed for the lane's next
    /// record, while its offset stays uncommitted until its job ends. Called after the last
    /// [`Slot::park`]. Refused while as many records settle as the consumer allows (the job
    /// then keeps its slot; a later call may be accepted); calls after the first accepted one
    /// change nothing.
    fn release(&self);
    /// The next records queued in the record's lane (at most `max`), in order, with their
    /// partition's stop signals: whose claims may be fetched ahead. `None` when the record
    /// has no ordered lane (unordered mode, unit tests).
    fn lane_ahead(&self, _max: usize) -> Option<(Arc<Stop>, Vec<Arc<RawRecord>>)> {
        None
    }
    /// The record did not end at its first poll (it waits for I/O, a timer or a slot): what
    /// its worker ran before it is told to the scheduler now, not when it ends.
    fn waits(&self) {}
    /// With transactional output: the record's claim is kept past its job's end, and marked
    /// done only once the transaction that carries the record's outcome commits (released
    /// if it never does). A slot without a job of its own (unit tests) drops it: the claim
    /// then runs out with its lease.
    fn complete_after_commit(&self, _claim: AfterCommit) {}
}

/// A record's claim kept past its job's end (transactional output): its key is marked done
/// once the transaction that carries the record's outputs, dead letter or forward and its
/// offset commits, and released when that transaction fails. Marked done before, the key
/// would make a redelivery after a crash skip the record, whose outputs never committed.
pub(crate) struct AfterCommit {
    pub(crate) key: String,
    pub(crate) claim: HeldClaim,
    /// Counted until it is marked done or released: the consumer's run waits for it.
    pub(crate) kept: KeptClaim,
}

/// A slot that is never given up: the record keeps it while it waits (unit tests, and the
/// benchmarks' worker harness).
#[cfg(any(test, kourier_bench))]
pub(crate) struct KeepSlot;

#[cfg(any(test, kourier_bench))]
impl Slot for KeepSlot {
    fn park(&self) {}
    fn resume(&self) -> Result<(), oneshot::Receiver<()>> {
        Ok(())
    }
    fn resume_now(&self) {}
    fn release(&self) {}
}

/// What a wait does when its partition starts draining (a revoke or a shutdown).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AtDrain {
    /// Go on if the wait ends before the drain's deadline: a retry back-off or a due time.
    /// Given up, the record would hold back the commit point of every record after it that
    /// already settled, and all of them would be handled again.
    FinishIfBefore,
    /// Give the record up at once: it is waiting for its claim or the key-order ledger,
    /// nothing of it has run, and the wait may last as long as an outage does.
    GiveUp,
}

/// Waits `delay` without holding a slot; returns whether the record goes on (`false`: it
/// is given up, holding its slot again, because its partition is draining — see
/// [`AtDrain`] — or its work is abandoned).
pub(crate) async fn back_off(delay: Duration, slot: &dyn Slot, stop: &Stop, at: AtDrain) -> bool {
    slot.park();
    let end = crate::clock::deadline_in(delay);
    let waited = tokio::select! {
        () = tokio::time::sleep_until(end) => true,
        () = stop.abandon.cancelled() => false,
        () = stop.drain.cancelled() => match stop.deadline() {
            Some(deadline) if at == AtDrain::FinishIfBefore && end <= deadline => tokio::select! {
                () = tokio::time::sleep_until(end) => true,
                () = stop.abandon.cancelled() => false,
            },
            _ => false,
        },
    };
    if !waited {
        slot.resume_now();
        return false;
    }
    match slot.resume() {
        Ok(()) => true,
        Err(handed) => {
            let resumed = tokio::select! {
                handed = handed => handed.is_ok(),
                () = stop.abandon.cancelled() => false,
            };
            if !resumed {
                slot.resume_now();
            }
            resumed
        }
    }
}

/// How a wait for the infrastructure (the store, the key-order ledger, the dead-letter
/// sink, a retry tier) ends early.
#[derive(Clone, Copy)]
pub(crate) enum InfraWait<'a> {
    /// Only when the record is given up (the revoke timeout or the shutdown deadline): the
    /// record's outcome is decided and is being written down.
    UntilAbandoned(&'a CancellationToken),
    /// Nothing of the record ran yet: it waits without its slot, and a drain gives it up
    /// at once ([`AtDrain::GiveUp`]).
    BeforeRunning(&'a Stop, &'a dyn Slot),
}

impl InfraWait<'_> {
    /// Waits before try number `failures + 1`; returns whether to try again.
    pub(crate) async fn wait(self, failures: u32) -> bool {
        match self {
            InfraWait::UntilAbandoned(cancel) => {
                sleep_or_cancel(infra_delay(failures), cancel).await
            }
            InfraWait::BeforeRunning(stop, slot) => {
                back_off(infra_delay(failures), slot, stop, AtDrain::GiveUp).await
            }
        }
    }
}
