//! What the poll thread and the workers share: the scheduler — buffers per partition and
//! lane, ordering and in-flight slots (`scheduler`), the buffer limits and flow-control
//! decisions (`buffer`), how partitions drain at a revoke or stop and what was given up
//! (`drain`), the commit point of each partition (`offsets`) and the finished offsets above it that a
//! commit's metadata carries (`finished`) — behind the hub's lock
//! (`hub`), and the consumer's connection health (`health`). Pure state, no
//! I/O: it may call the breaker (to hold dispatch) and [`stop`](super::stop), nothing that
//! talks to Kafka or a store.

mod buffer;
mod drain;
mod finished;
mod health;
mod hub;
mod lifecycle;
mod offsets;
mod scheduler;
mod topic_partition;

pub(crate) use self::buffer::*;
pub(crate) use self::finished::decode as decode_finished;
pub(crate) use self::health::*;
pub use self::health::{ConnectionState, PartitionStatus};
pub(crate) use self::hub::*;
pub use self::lifecycle::RunState;
#[cfg(kourier_bench)]
pub(crate) use self::offsets::OffsetTracker;
pub use self::scheduler::ProcessingOrder;
pub(crate) use self::scheduler::*;
pub(crate) use self::topic_partition::*;
