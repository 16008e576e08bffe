//! kourier: reliable Kafka consumers (crate docs written with the consumer).

pub use async_trait::async_trait;
pub use rdkafka;

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
pub use crate::dead_letter::{
    DeadLetter, DeadLetterError, DeadLetterReason, DeadLetterReceipt, DeadLetterSink,
    KafkaDeadLetterSink,
};
pub use crate::error::{BoxError, ConfigError, Error, Result};
pub use crate::handler::{FailureKind, Handler, HandlerError, HandlerFn, handler_fn};
pub use crate::idempotency::{
    Claim, ClaimToken, IdempotencyStore, InMemoryIdempotencyStore, RedisIdempotencyStore,
    StoreError,
};
pub use crate::message::{Header, Headers, Message, RawRecord};
pub use crate::retry::{RetryDecision, RetryPolicy};
