//! Shared helpers for the integration tests: where the real Kafka broker and Redis are, unique
//! names, creating topics, producing and reading records, committed offsets, Redis clients,
//! and running a consumer in the background.
//!
//! Every test file that needs them declares `mod support;`. The services come from
//! `scripts/services up`, or from `KAFKA_BOOTSTRAP_SERVERS` / `REDIS_URL` when those are set.
//! A service that cannot be reached fails the test with a message naming that command: tests
//! never skip silently.
//!
//! The Kafka helpers run rdkafka's blocking clients inside `spawn_blocking`, so they work from
//! both the current-thread and the multi-thread Tokio test runtimes.
#![allow(dead_code)] // each test file uses a different subset

mod background;
pub(crate) mod consumer;
pub(crate) mod exploding;
mod groups;
pub(crate) mod own_broker;
mod produce;
pub(crate) mod proxy;
mod raw_produce;
mod read;
pub(crate) mod recorder;
pub(crate) mod redis_server;
mod services;
pub(crate) mod sinks;
pub(crate) mod store;
mod topics;

// The helpers most tests use, by their short names (`support::produce`, ...).
#[allow(unused_imports)] // each test file uses a different subset
pub(crate) use self::{groups::*, produce::*, raw_produce::*, read::*, services::*, topics::*};

/// The wall clock in milliseconds since the Unix epoch (the unit of Kafka timestamps and of
/// kourier's time headers).
pub(crate) fn now_ms() -> i64 {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is past 1970");
    i64::try_from(since_epoch.as_millis()).expect("in range")
}
