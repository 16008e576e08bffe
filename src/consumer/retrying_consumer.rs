//! [`RetryingConsumer`]: runs the poll thread and the workers until shutdown.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use rdkafka::consumer::BaseConsumer;

use crate::consumer::observe::ConsumerMonitor;
use crate::consumer::poll::KourierContext;
use crate::consumer::poll::provision;
use crate::consumer::poll::{PollSettings, poll_loop};
use crate::consumer::poll::{ShutdownReport, shutdown_signal};
use crate::consumer::schedule::Hub;
use crate::consumer::schedule::{Job, RunState};
use crate::consumer::work::WorkerContext;
use crate::consumer::worker_task::work;
use crate::error::{Error, PollThreadError, Result, error_chain};
use crate::guard::guarded;
use crate::handler::Handler;

/// A Kafka consumer that runs a [`Handler`] for every record with retries, dead-lettering,
/// optional idempotency and at-least-once commits.
///
/// Build one with [`RetryingConsumer::builder`], then [`run`](RetryingConsumer::run) it until
/// a shutdown future resolves. See the crate docs for the delivery guarantees.
pub struct RetryingConsumer<H: Handler> {
    pub(crate) consumer: BaseConsumer<KourierContext>,
    pub(crate) hub: Arc<Hub>,
    pub(crate) worker: Arc<WorkerContext<H>>,
    pub(crate) settings: PollSettings,
}

impl<H: Handler> fmt::Debug for RetryingConsumer<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryingConsumer")
            .field("topics", &self.settings.topics)
            .field("group_id", &self.worker.group_id)
            .finish_non_exhaustive()
    }
}

impl<H: Handler> RetryingConsumer<H> {
    /// A handle that reports what the consumer is doing, usable while it runs.
    pub fn monitor(&self) -> ConsumerMonitor {
        ConsumerMonitor {
            hub: self.hub.clone(),
        }
    }

    /// Runs the consumer until `shutdown` resolves, then shuts down gracefully: stops taking
    /// records, lets in-flight records finish within the shutdown timeout, commits settled
    /// offsets synchronously and leaves the group.
    ///
    /// Must be called within a Tokio runtime (any flavour); handlers run as tasks on it.
    /// Polling happens on a dedicated thread, so handlers and back-offs never delay it.
    ///
    /// Before it subscribes it runs the startup checks (see
    /// [`startup_timeout`](crate::RetryingConsumerBuilder::startup_timeout)): the cluster
    /// must answer and every topic it needs must exist.
    ///
    /// Returns a [`ShutdownReport`] that says whether any record was given up unsettled
    /// (it is delivered again after a restart) and whether the final commit failed: it is
    /// retried with a short back-off until the shutdown deadline, polling meanwhile, and a
    /// commit still failing then is reported ([`ShutdownReport::commit_error`],
    /// [`ShutdownReport::uncommitted`]; those partitions' records settled since their last
    /// commit are delivered again after a restart). [`ShutdownReport::into_result`] turns
    /// either into an error ([`Error::Abandoned`], [`Error::Commit`]) for callers that want
    /// `?` to catch it.
    ///
    /// # Errors
    /// [`Error::BrokersUnreachable`] naming the servers when the cluster does not answer
    /// within the startup timeout, whatever step met it (the startup checks, or creating
    /// missing topics with
    /// [`MissingTopics::create`](crate::MissingTopics::create)),
    /// or when it stays unreachable longer than
    /// [`max_broker_outage`](crate::RetryingConsumerBuilder::max_broker_outage);
    /// [`Error::MissingTopics`] from the startup checks; [`Error::Topic`] when a broker
    /// answers and refuses to create a missing topic;
    /// [`Error::Kafka`] when subscribing fails or the client hits a fatal error;
    /// [`Error::PollThread`] when the poll thread could not be started or panicked, its
    /// cause a [`PollThreadError`].
    pub async fn run<S>(self, shutdown: S) -> Result<ShutdownReport>
    where
        S: Future<Output = ()> + Send,
    {
        let RetryingConsumer {
            consumer,
            hub,
            worker,
            settings,
        } = self;
        hub.lifecycle.set(RunState::Starting);
        if let Some(create) = &settings.startup.create
            && let Err(e) = provision(&settings.startup, create).await
        {
            hub.lifecycle.end(Some(error_chain(&e)));
            return Err(e);
        }
        // Claims fetched ahead for records that never ran are released once the poll
        // thread is done (the next owner of their partitions must not find them busy).
        let ahead = worker.dedup.as_ref().map(|d| d.ahead.clone());
        let claims_limit = settings.shutdown_timeout;
        let runtime = tokio::runtime::Handle::current();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let thread_hub = hub.clone();
        std::thread::Builder::new()
            .name("kourier-poll".into())
            .spawn(move || {
                // Whatever is dropped here (the handler, the sink, the store) may need the
                // runtime, e.g. a connection pool: keep its context entered.
                let _runtime = runtime.enter();
                let spawn_hub = thread_hub.clone();
                let spawner = runtime.clone();
                let spawn = move |job: Job| {
                    spawner.spawn(work(worker.clone(), spawn_hub.clone(), job));
                };
                let result = caught(|| poll_loop(consumer, &thread_hub, &settings, &spawn));
                if let Some(t) = thread_hub.transactions() {
                    // No transaction commits any more: claims still waiting for one are
                    // released (their records' outputs were not committed).
                    t.close();
                }
                // Here rather than in `run`: the poll thread finishes even when `run`'s
                // future was dropped, and the monitor must see it end.
                thread_hub
                    .lifecycle
                    .end(result.as_ref().err().map(|e| error_chain(e)));
                // Drop the handler before `run` returns, inside the runtime context.
                drop(spawn);
                let _ = done_tx.send(result);
            })
            .map_err(|e| {
                let e = Error::PollThread(PollThreadError::Spawn(e));
                hub.lifecycle.end(Some(error_chain(&e)));
                e
            })?;

        // Stop the poll thread if this future is dropped, too.
        let _guard = StopOnDrop(hub.clone());
        let mut done_rx = done_rx;
        let result = tokio::select! {
            result = &mut done_rx => result,
            () = shutdown => {
                hub.request_stop();
                done_rx.await
            }
        };
        if let Some(ahead) = ahead {
            ahead.release_all().await;
        }
        if let Some(t) = hub.transactions() {
            // Claims kept until their transaction committed: marked done (the final commit
            // carried them) or released, before `run` returns.
            t.claims_settled(claims_limit).await;
        }
        flatten(result)
    }

    /// Runs until SIGINT (Ctrl-C) or, on Unix, SIGTERM; see [`RetryingConsumer::run`].
    ///
    /// # Errors
    /// As for [`RetryingConsumer::run`].
    pub async fn run_until_signal(self) -> Result<ShutdownReport> {
        self.run(shutdown_signal()).await
    }
}

/// The poll loop's result, its panic as [`PollThreadError::Panicked`] with the message.
fn caught(poll_loop: impl FnOnce() -> Result<ShutdownReport>) -> Result<ShutdownReport> {
    guarded(poll_loop).unwrap_or_else(|panic| Err(PollThreadError::Panicked(panic).into()))
}

fn flatten(
    result: std::result::Result<Result<ShutdownReport>, tokio::sync::oneshot::error::RecvError>,
) -> Result<ShutdownReport> {
    // No result at all: the thread panicked after its loop (dropping the handler).
    result.unwrap_or_else(|_| {
        Err(PollThreadError::Panicked("the poll thread ended without a result".into()).into())
    })
}

struct StopOnDrop(Arc<Hub>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.request_stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A panic on the poll thread reaches `run()`'s caller as a typed cause with its
    /// message; a thread that ended without a result too.
    #[test]
    fn a_panicking_poll_loop_is_a_typed_poll_thread_error() {
        let err = caught(|| panic!("rebalance callback broke")).unwrap_err();
        assert!(
            matches!(&err, Error::PollThread(PollThreadError::Panicked(m)) if m == "rebalance callback broke"),
            "{err:?}"
        );
        assert!(caught(|| Ok(ShutdownReport::default())).is_ok());
        let (tx, rx) = tokio::sync::oneshot::channel::<Result<ShutdownReport>>();
        drop(tx);
        let err = flatten(rx.blocking_recv()).unwrap_err();
        assert!(
            matches!(&err, Error::PollThread(PollThreadError::Panicked(_))),
            "{err:?}"
        );
    }
}
