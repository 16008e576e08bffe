//! What the consumer tells the outside while it runs: the [`ConsumerMonitor`] snapshot
//! (read from the shared state and the breaker) and librdkafka's statistics, parsed for the
//! lag of each partition.

mod monitor;
mod stats;

pub(crate) use self::monitor::publish_caught_up;
pub use self::monitor::{ConsumerMonitor, ConsumerSnapshot};
pub(crate) use self::stats::*;
