//! A consumer running in the background until told to stop: its task and its monitor. The
//! throughput benchmark includes this file too (`benches/throughput/consumers.rs`); each adds
//! its own way of stopping it.

use kourier::{ConsumerMonitor, Handler, RetryingConsumer, ShutdownReport};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A consumer's `run`, spawned on the current runtime until `stop` is sent (or dropped).
pub(crate) struct Running {
    pub(crate) stop: oneshot::Sender<()>,
    pub(crate) task: JoinHandle<kourier::Result<ShutdownReport>>,
    /// The running consumer's monitor.
    pub(crate) monitor: ConsumerMonitor,
}

impl Running {
    /// Spawns `consumer.run` on the current runtime.
    pub(crate) fn spawn<H: Handler>(consumer: RetryingConsumer<H>) -> Running {
        let monitor = consumer.monitor();
        let (stop, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(consumer.run(async {
            let _ = rx.await;
        }));
        Running {
            stop,
            task,
            monitor,
        }
    }
}
