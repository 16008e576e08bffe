//! The engine: [`RetryingConsumer`] and everything that runs inside it.
//!
//! Data flows one way: the poll thread ([`poll`]) takes records from librdkafka and hands
//! them to the scheduler ([`scheduler`], in the [`hub`]), which releases them to workers
//! ([`worker`]) under the ordering mode; each worker reports its record settled back to the
//! scheduler, whose per-partition watermarks ([`offsets`]) decide what [`commit`] commits.
//! [`rebalance`] and [`shutdown`] are the two ways partitions leave; [`flow`] pauses and
//! resumes them; [`breaker`] holds dispatch while the handlers' downstream is down.
//! Idempotency: [`dedup`] holds the settings, [`lease`] renews a running record's claim,
//! [`store_batch`] and [`claim_ahead`] cut the store's round trips. [`builder`] assembles
//! it all.

#[cfg(feature = "bench-internals")]
pub mod bench_support;
mod breaker;
mod builder;
mod claim_ahead;
mod commit;
mod context;
mod dedup;
#[cfg(test)]
mod duration_tests;
mod flow;
mod health;
mod hub;
mod lease;
mod monitor;
mod offsets;
mod outcome;
mod poll;
mod rebalance;
mod retrying_consumer;
mod scheduler;
mod shutdown;
mod startup;
mod stats;
mod stop;
mod store_batch;
mod tiers;
mod topic_partition;
mod worker;

pub use self::breaker::{BreakerPolicy, BreakerState, BreakerStatus, BreakerTransition};
pub use self::builder::RetryingConsumerBuilder;
pub use self::dedup::DedupKey;
pub use self::health::{ConnectionState, PartitionStatus};
pub use self::monitor::{ConsumerMonitor, ConsumerSnapshot};
pub use self::outcome::RecordOutcome;
pub use self::retrying_consumer::RetryingConsumer;
pub use self::scheduler::ProcessingOrder;
pub use self::shutdown::{ShutdownReport, shutdown_signal};
