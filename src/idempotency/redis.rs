//! Redis idempotency store (placeholder, being written).
/// Placeholder.
#[derive(Debug)]
pub struct RedisIdempotencyStore;
/// Placeholder.
#[derive(Debug)]
pub struct RedisIdempotencyStoreBuilder;
