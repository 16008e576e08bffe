//! What the poll thread and the workers share: the scheduler (buffers per partition and
//! lane, ordering, in-flight slots, flow-control decisions and the commit point of each
//! partition), behind the hub's lock, and the consumer's connection health. Pure state, no
//! I/O: it may call the breaker (to hold dispatch) and [`stop`](super::stop), nothing that
//! talks to Kafka or a store.

mod health;
mod hub;
mod offsets;
mod scheduler;
mod topic_partition;

pub(crate) use self::health::*;
pub use self::health::{ConnectionState, PartitionStatus};
pub(crate) use self::hub::*;
#[cfg(kourier_bench)]
pub(crate) use self::offsets::OffsetTracker;
pub use self::scheduler::ProcessingOrder;
pub(crate) use self::scheduler::*;
pub(crate) use self::topic_partition::*;
