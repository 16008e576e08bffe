//! Idempotency inside the engine: where a record's dedup keys come from and which position
//! of its event a delivery is (`keys`), the claims fetched ahead for a lane's next records
//! (`claim_ahead`), the batching of workers' claims and completions into store calls
//! (`store_batch`) and the renewal of a running record's claim (`lease`). It may call the
//! idempotency store and [`stop`](super::stop); the worker drives it.

mod claim_ahead;
mod keys;
mod lease;
mod store_batch;

pub(crate) use self::claim_ahead::*;
pub use self::keys::DedupKey;
pub(crate) use self::keys::*;
pub(crate) use self::lease::*;
