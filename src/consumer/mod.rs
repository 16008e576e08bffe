//! The engine: [`RetryingConsumer`] and everything that runs inside it, in rooms by job.
//! Data flows one way, **poll → schedule → work → settle → commit**:
//!
//! | room | job | may call |
//! |---|---|---|
//! | [`poll`] | the poll thread: the only code touching the rdkafka consumer — the loop, librdkafka's callbacks, flow control, rebalances, commits, startup checks, shutdown | `schedule`, `observe` |
//! | [`observe`] | what the consumer tells the outside: the monitor's snapshot, librdkafka's statistics | `schedule`, `breaker` |
//! | [`work`] | a record's life on a worker: decode, claim, admission, attempts, retries, dead letter or forward, its outcome | `dedup`, `breaker`, `schedule` (its slot, the job's end), the plug-ins |
//! | [`dedup`] | idempotency in the engine: dedup keys and delivery positions, claims fetched ahead, batched store calls, lease renewal | the store, `stop` |
//! | [`schedule`] | the shared state: buffers, lanes, ordering, slots, the commit point, behind the hub; connection health | `breaker`, `stop` |
//! | [`breaker`] | the outage breaker: policy, state machine, the gate before each attempt | `stop` |
//! | [`stop`] | how a record's processing is told to stop early | — |
//!
//! At the top, [`builder`] checks the settings and assembles the rooms, and
//! [`retrying_consumer`] runs the poll thread and the workers until shutdown.

#[cfg(kourier_bench)]
pub mod bench_support;
mod breaker;
mod builder;
mod dedup;
#[cfg(test)]
mod duration_tests;
mod observe;
mod poll;
mod retrying_consumer;
mod schedule;
mod stop;
mod transaction;
mod work;
mod worker_task;

pub use self::breaker::{
    BreakerPolicy, BreakerState, BreakerStatus, BreakerTransition, DestinationStatus, Destinations,
    DestinationsStatus, GoneRecords,
};
pub use self::builder::{
    CommitMetadata, Idempotency, MissingTopics, PanicPolicy, RetryingConsumerBuilder, StoreOutage,
};
pub use self::dedup::DedupKey;
pub use self::observe::{ConsumerMonitor, ConsumerSnapshot};
pub use self::poll::{ShutdownReport, shutdown_signal};
pub use self::retrying_consumer::RetryingConsumer;
pub use self::schedule::{ConnectionState, PartitionStatus, ProcessingOrder, RunState};
pub use self::work::RecordOutcome;
// The health routes' unit tests run a monitor on a hub of their own.
#[cfg(feature = "queue")]
pub(crate) use self::breaker::{Breaker, OutageGate, ProbeMemo, Verdict, caller_of};
#[cfg(feature = "queue")]
pub(crate) use self::dedup::Dedup;
#[cfg(all(test, feature = "health"))]
pub(crate) use self::schedule::Hub;
#[cfg(feature = "queue")]
pub(crate) use self::stop::{Signal, Stop};
#[cfg(feature = "queue")]
pub(crate) use self::work::OutcomeObserver;
