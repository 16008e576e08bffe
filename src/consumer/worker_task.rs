//! The worker task: runs the jobs the scheduler hands it one after another, and keeps writing
//! down the outcomes of the jobs it moved on from.
//!
//! A job whose outcome is decided but still being written (its key marked done in the
//! idempotency store, its dead letter awaiting the broker's acknowledgement) releases its lane
//! and slot ([`Slot::release`]). The worker then starts the slot's next job at once and keeps
//! the released job as a *tail*, polled in the same task until it settles: no task is spawned
//! and no thread woken per record, and the job futures' allocations are reused (one box per
//! job running or settling at a time, kept for the next job once it ends).
//!
//! With transactional output and idempotency, a job whose record succeeded ends (its outputs
//! and offset enter the open transaction) and its future stays a tail, which keeps the
//! record's claim renewed until that transaction commits and then marks its key done
//! ([`Slot::complete_after_commit`]).
//!
//! A worker ends when it has no job to run and no tail left. A job that gives its slot up
//! while it waits out a retry back-off ([`Slot::park`]) stays the worker's current job; the
//! freed slot's next job runs on a new worker task (a back-off can be long).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use futures_util::stream::{FuturesUnordered, StreamExt};
use tracing::{error, warn};

use crate::consumer::schedule::{Hub, Job, JobEnd, Stop};
use crate::consumer::work::{AfterCommit, Slot, WorkerContext};
use crate::handler::Handler;
use crate::record::RawRecord;

/// At most this many job futures' boxes are kept for reuse by one worker.
const SPARE_BOXES: usize = 8;

/// A worker: runs `job`, then each next job the scheduler hands it, while writing down the
/// outcomes of the jobs that released their slot (see the module docs).
pub(crate) async fn work<H: Handler>(ctx: Arc<WorkerContext<H>>, hub: Arc<Hub>, job: Job) {
    let handoff = Arc::new(Handoff::default());
    let start = |job| run_one(JobRun::new(&ctx, &hub, job, &handoff));
    let mut current = Some(Box::pin(start(job)));
    let mut spare = Vec::new();
    let mut tails = FuturesUnordered::new();
    std::future::poll_fn(|cx| {
        loop {
            while let Poll::Ready(Some(done)) = tails.poll_next_unpin(cx) {
                if spare.len() < SPARE_BOXES {
                    spare.push(done);
                }
            }
            let Some(running) = current.as_mut() else {
                return if tails.is_empty() {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                };
            };
            let ended = running.as_mut().poll(cx).is_ready();
            // The job hands its slot over exactly once: when it releases it, or when it ends.
            let Some(next) = handoff.take() else {
                debug_assert!(!ended, "a job ended without handing its slot over");
                return Poll::Pending;
            };
            let Some(done) = current.take() else {
                unreachable!("polled above");
            };
            if ended {
                spare.push(done);
            } else {
                tails.push(Tail(Some(done)));
            }
            current = next.map(|job| match spare.pop() {
                Some(mut reused) => {
                    reused.set(start(job));
                    reused
                }
                None => Box::pin(start(job)),
            });
        }
    })
    .await;
}

/// Runs one job to its end and hands its slot over (see [`JobRun::end`]); with
/// transactional output, a claim its record kept is then marked done once the transaction
/// it finished in commits (the job's slot went to the next job already). A job whose record
/// settled goes on with the next record of its run in this same future (no new future
/// built and moved into the worker's box per record: it is a few kilobytes); a run is at
/// most `RUN_RECORDS` (32) records or `RUN_FOR` (2 ms).
async fn run_one<H: Handler>(mut run: JobRun<H>) {
    loop {
        let Some(job) = run.job.as_ref() else {
            return;
        };
        let end = run.ctx.run_job(job.record.clone(), &job.stop, &run).await;
        let kept = run
            .after_commit
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        // Only a record whose claim waits for the commit is kept past its job's end.
        let record = kept
            .as_ref()
            .and(run.job.as_ref())
            .map(|job| job.record.clone());
        // A record whose claim waits for its transaction's commit never goes on with a run
        // (runs are off with transactional output; checked here all the same).
        let finished_in = match run.end(end, kept.is_none()) {
            Ended::Advanced(next) => {
                run.job = Some(next);
                continue;
            }
            Ended::HandedOver(finished_in) => finished_in,
        };
        if let (Some(kept), Some(record)) = (kept, record) {
            run.ctx
                .complete_after_commit(kept, &record, finished_in)
                .await;
        }
        return;
    }
}

/// How a job's end went on ([`JobRun::end`]).
enum Ended {
    /// Its record settled and the job moved on to the next record of its run, without the
    /// scheduler (see `Run`): still this future's, its slot kept.
    Advanced(Job),
    /// Its slot was handed over (or it settles, released); with transactional output, the
    /// number of the transaction its record finished in.
    HandedOver(Option<u64>),
}

/// The slot's next job, set by the worker's current job when it hands its slot over.
#[derive(Default)]
struct Handoff(Mutex<Option<Option<Job>>>);

impl Handoff {
    fn hand(&self, next: Option<Job>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(next);
    }

    /// `Some(next)` once the current job handed its slot over (`next` is the slot's next
    /// job, if any).
    fn take(&self) -> Option<Option<Job>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// A released job's future, polled until it settles; yields its box for reuse.
struct Tail<F>(Option<Pin<Box<F>>>);

impl<F: Future<Output = ()>> Future for Tail<F> {
    type Output = Pin<Box<F>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(job) = self.0.as_mut() else {
            return Poll::Pending;
        };
        match job.as_mut().poll(cx) {
            Poll::Ready(()) => self.0.take().map_or(Poll::Pending, Poll::Ready),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// One job on a worker: the record's in-flight slot ([`Slot`]), and how the job ends.
///
/// Whatever unwinds through the worker task (a bug: plug-in panics are caught where they are
/// called), the job still ends when this is dropped: it is given up unsettled (never
/// committed past), its slot and lane are released, and the job the scheduler hands back runs
/// on a fresh worker task (delivery rule 14 in the crate docs).
struct JobRun<H: Handler> {
    ctx: Arc<WorkerContext<H>>,
    hub: Arc<Hub>,
    /// `None` once the job's end was recorded.
    job: Option<Job>,
    /// The job's lane and slot were released already (its end is being written).
    released: AtomicBool,
    handoff: Arc<Handoff>,
    /// The record's claim, kept until the transaction it finishes in commits.
    after_commit: Mutex<Option<AfterCommit>>,
}

impl<H: Handler> JobRun<H> {
    fn new(ctx: &Arc<WorkerContext<H>>, hub: &Arc<Hub>, job: Job, handoff: &Arc<Handoff>) -> Self {
        JobRun {
            ctx: Arc::clone(ctx),
            hub: Arc::clone(hub),
            job: Some(job),
            released: AtomicBool::new(false),
            handoff: Arc::clone(handoff),
            after_commit: Mutex::new(None),
        }
    }

    /// Records how the job ended: a released job settles (its slot went to the next job
    /// already); a settled one goes on with its run's next record when it may (and
    /// `may_advance`); any other frees its slot, whose next job is handed to the worker.
    fn end(&mut self, end: JobEnd, may_advance: bool) -> Ended {
        let Some(mut job) = self.job.take() else {
            return Ended::HandedOver(None);
        };
        if *self.released.get_mut() {
            return Ended::HandedOver(self.hub.settle(job, end));
        }
        if end == JobEnd::Settled
            && may_advance
            // A partition drains before its records are given up (`abandon`): the rest of
            // the run goes back to the scheduler, which keeps only gap fillers.
            && !job.stop.drain.is_cancelled()
            && !self.hub.breaker_holds()
            && job.advance()
        {
            // The next record of its run, without the scheduler (see `Run`). (Runs are off
            // with transactional output.)
            Ended::Advanced(job)
        } else {
            let (next, finished_in) = self.hub.finish_in_transaction(job, end);
            self.handoff.hand(next);
            Ended::HandedOver(finished_in)
        }
    }

    fn job(&self) -> &Job {
        self.job
            .as_ref()
            .unwrap_or_else(|| unreachable!("a job's slot is used only while it runs"))
    }
}

impl<H: Handler> Slot for JobRun<H> {
    fn park(&self) {
        if let Some(next) = self.hub.park(self.job()) {
            tokio::spawn(work(self.ctx.clone(), self.hub.clone(), next));
        }
    }

    fn resume(&self) -> std::result::Result<(), tokio::sync::oneshot::Receiver<()>> {
        self.hub.lock().resume(self.job().id)
    }

    fn resume_now(&self) {
        self.hub.lock().resume_now(self.job().id);
    }

    fn release(&self) {
        if self.released.load(Ordering::SeqCst) {
            return;
        }
        // Refused while too many records settle: the job keeps its slot until it ends (or
        // until a later release is accepted).
        if let Ok(next) = self.hub.release_lane(self.job()) {
            self.released.store(true, Ordering::SeqCst);
            self.handoff.hand(next);
        }
    }

    fn lane_ahead(&self, max: usize) -> Option<(Arc<Stop>, Vec<Arc<RawRecord>>)> {
        let job = self.job();
        // Its run's records come first: they are the lane's next ones.
        let mut next: Vec<_> = job.run_ahead(max);
        if next.len() < max {
            let rest = self.hub.lock().lane_ahead(job, max - next.len());
            next.extend(rest);
        }
        Some((job.stop.clone(), next))
    }

    fn waits(&self) {
        let job = self.job();
        if job.run_unreported() {
            self.hub.report_run(job);
        }
    }

    fn complete_after_commit(&self, claim: AfterCommit) {
        *self
            .after_commit
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(claim);
    }
}

impl<H: Handler> Drop for JobRun<H> {
    fn drop(&mut self) {
        let Some(job) = self.job.take() else {
            return;
        };
        if std::thread::panicking() {
            error!(coordinates = %job.record.coordinates(), "worker task panicked: the record is given up unsettled (it is not committed past; delivered again after a rebalance or restart)");
        } else {
            // Dropped without a panic: its runtime shut down (or the consumer was dropped
            // with it) while the record ran.
            warn!(coordinates = %job.record.coordinates(), "worker task dropped (its runtime shut down): the record is given up unsettled (it is not committed past; delivered again after a restart)");
        }
        if *self.released.get_mut() {
            self.hub.settle(job, JobEnd::Abandoned);
            return;
        }
        if let Some(next) = self.hub.finish(job, JobEnd::Abandoned)
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(work(self.ctx.clone(), self.hub.clone(), next));
        }
    }
}
