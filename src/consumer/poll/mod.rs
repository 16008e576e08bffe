//! The poll thread: the only code that touches the rdkafka consumer, and everything that
//! runs on it — the loop (`thread`), librdkafka's callbacks (`context`), pausing and
//! resuming partitions (`flow`), rebalances and partition resets (`rebalance`), commits
//! (`commit`), records read in runs from a queue of its own (`split`), the startup checks
//! and topic provisioning (`startup`) and the graceful shutdown (`shutdown`). Flow control,
//! rebalances, commits and the shutdown reach the consumer through
//! [`client::PollConsumer`], a seam that lets unit tests drive them with a fake consumer. It
//! may call the shared state (the scheduler behind the hub) and the observers, never a
//! worker.

mod client;
mod commit;
mod context;
mod flow;
mod rebalance;
mod shutdown;
mod split;
mod startup;
mod thread;

pub(crate) use self::context::*;
pub use self::shutdown::{ShutdownReport, shutdown_signal};
pub(crate) use self::startup::*;
pub(crate) use self::thread::*;
