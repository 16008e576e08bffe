//! In-memory idempotency store (placeholder, being written).
/// Placeholder.
#[derive(Debug)]
pub struct InMemoryIdempotencyStore;
