//! # kourier — reliable Kafka consumers
//!
//! Teams move slow work (mail, push notifications, webhooks) off their synchronous APIs onto
//! Kafka. kourier is the consumer side of that pattern as a library: implement a
//! [`Handler`] for your event type, and a [`RetryingConsumer`] runs it for every record with
//! retries, a dead-letter topic, optional idempotency and at-least-once commits. A typed,
//! keyed [`Publisher`] is the producer side.
//!
//! ## Quick start
//!
//! ```no_run
//! use kourier::{async_trait, Handler, HandlerError, Message, Ordering, RetryingConsumer};
//! use serde::Deserialize;
//!
//! #[derive(Deserialize)]
//! struct NotifyEvent { event_id: String, user_id: String, to: String }
//!
//! struct Mailer;
//!
//! #[async_trait]
//! impl Handler for Mailer {
//!     type Event = NotifyEvent;
//!     async fn handle(&self, message: &Message<NotifyEvent>) -> Result<(), HandlerError> {
//!         let event = message.event();
//!         if !event.to.contains('@') {
//!             return Err(HandlerError::permanent("invalid address")); // dead-lettered now
//!         }
//!         // send the mail; `?` on an error makes it a transient failure (retried)
//!         Ok(())
//!     }
//! }
//!
//! #[tokio::main]
//! async fn main() -> kourier::Result<()> {
//!     RetryingConsumer::builder(Mailer)
//!         .bootstrap_servers("127.0.0.1:9092")
//!         .group_id("notifier")
//!         .topic("notify.v1")
//!         .ordering(Ordering::Key)
//!         .build()?
//!         .run_until_signal()
//!         .await
//! }
//! ```
//!
//! ## Delivery semantics
//!
//! These are the contract; tests against a real broker and Redis hold kourier to them.
//!
//! 1. **At-least-once.** A record's offset is committed only when it and every lower record
//!    of its partition are *settled*: handled successfully, dead-lettered with the broker's
//!    acknowledgement, or skipped as a duplicate. Records completing out of order (key mode)
//!    commit only the contiguous prefix; offsets are never assumed dense.
//! 2. **Ordering** ([`Ordering`]). `Partition` (default): one record per partition at a time,
//!    in offset order, retries included. `Key`: one record per key at a time, in order;
//!    different keys of a partition run in parallel; null keys fall back to partition order.
//!    `Unordered`: none. `max_in_flight` bounds every mode.
//! 3. **Retries are explicit** ([`RetryPolicy`]): attempts include the first try; fixed or
//!    exponential with jitter, with a maximum elapsed time. Waiting is an async timer while
//!    polling continues on a dedicated thread, so a long back-off never makes the consumer
//!    leave its group.
//! 4. **Classification** ([`HandlerError`]): transient → retried, then dead-lettered as
//!    `retries-exhausted`; permanent → dead-lettered at once. A record the [`Codec`] cannot
//!    decode (bad JSON, wrong schema, null value) is a poison pill: dead-lettered at once as
//!    `decode`, the handler is never called. A panicking handler counts as a transient
//!    failure.
//! 5. **Dead letters keep everything**: same key, same value bytes (null stays null), the
//!    original headers, plus provenance headers ([`dead_letter::headers`]). The default sink
//!    writes to `<topic>.dlt`, to the source partition when the dead-letter topic has it,
//!    else by key.
//! 6. **A failed dead-letter write is never dropped**: it is retried with back-off, logged,
//!    and the partition's offset does not move past it meanwhile.
//! 7. **Idempotency is claim → work → complete** ([`idempotency`]): a key is marked done only
//!    after the handler succeeded; a failed attempt releases its claim so the retry runs; a
//!    dead-lettered record is never marked done; a key held by another worker is waited for,
//!    never skipped; a store outage makes records wait (or, opted in, run without dedup).
//! 8. **Graceful shutdown**: stop taking records, let in-flight records finish within the
//!    shutdown timeout, commit synchronously, leave the group. After a clean shutdown and a
//!    restart no record is handled twice.
//! 9. **Rebalance**: on revoke, dispatching stops for the revoked partitions, their in-flight
//!    records are waited for (bounded), their settled offsets are committed synchronously and
//!    their buffered records dropped; late completions from an old assignment are ignored.
//! 10. **Bounded memory**: buffered records are bounded by count and bytes; above the limits
//!     partitions are paused (polling continues) and resumed below half.
//! 11. **Bad input never crashes the consumer**: malformed payloads, null keys and values,
//!     empty payloads, binary or non-UTF-8 headers end as handled records or dead letters.
//! 12. **Bad configuration is an error from `build()`** ([`ConfigError`]), never a panic.
//!
//! Duplicates remain possible (that is what at-least-once means) for records in flight when
//! a consumer crashes or loses its partitions past the revoke timeout; an [`IdempotencyStore`]
//! turns most of those into skips.
//!
//! ## Architecture
//!
//! A dedicated poll thread owns the rdkafka consumer: it polls, feeds a scheduler that
//! buffers records per partition and lane (partition, key or record, by ordering mode),
//! pauses and resumes partitions, commits settled offsets and serves rebalances. Workers are
//! Tokio tasks on your runtime: each runs decode → claim → handler → retry → dead-letter →
//! complete/release, then reports the record settled and takes the next one.
//!
//! ## Why not `backoff`
//!
//! The design card named the `backoff` crate; it is unmaintained (RUSTSEC-2025-0012) and pulls
//! `instant` (RUSTSEC-2024-0384). kourier's [`RetryPolicy`] is its own small public type the
//! consumer drives (so it can be tested with paused time and keeps third-party types out of
//! the API); internal infrastructure retries use `backon`, already a dependency of `redis`.
//!
//! ## Minimum supported Rust version
//!
//! Rust 1.88 (`rust-version` in Cargo.toml), set by the `redis` 1.x dependency.

pub use async_trait::async_trait;
pub use rdkafka;
pub use redis;

mod codec;
mod consumer;
pub mod dead_letter;
mod error;
mod handler;
pub mod idempotency;
mod message;
mod publisher;
mod retry;

pub use crate::codec::{BytesCodec, Codec, CodecFn, DecodeError, JsonCodec, codec_fn};
pub use crate::consumer::{
    ConsumerMonitor, ConsumerSnapshot, DedupKey, Ordering, RetryingConsumer,
    RetryingConsumerBuilder, shutdown_signal,
};
pub use crate::dead_letter::{
    DeadLetter, DeadLetterError, DeadLetterReason, DeadLetterReceipt, DeadLetterSink,
    KafkaDeadLetterSink, KafkaDeadLetterSinkBuilder,
};
pub use crate::error::{BoxError, ConfigError, Error, Result};
pub use crate::handler::{FailureKind, Handler, HandlerError, HandlerFn, handler_fn};
pub use crate::idempotency::{
    Claim, ClaimToken, IdempotencyStore, InMemoryIdempotencyStore, RedisIdempotencyStore,
    RedisIdempotencyStoreBuilder, StoreError,
};
pub use crate::message::{Header, Headers, Message, RawRecord};
pub use crate::publisher::{Delivery, Publisher, PublisherBuilder, java_partition};
pub use crate::retry::{RetryDecision, RetryPolicy};
