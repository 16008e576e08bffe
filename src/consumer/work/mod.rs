//! A record's life on a worker: decode, dedup key, claim, the key-order ledger's admission,
//! attempts with the breaker and the retry policy, then handled, dead-lettered or forwarded
//! to a retry tier, and how it ended (`outcome`). It calls the plug-ins (codec, handler,
//! store, sink, ledger), the breaker and the dedup room; it reports to the scheduler only
//! through its slot and the job's end.

mod outcome;
mod tiers;
mod worker;

pub use self::outcome::RecordOutcome;
pub(crate) use self::outcome::*;
pub(crate) use self::worker::*;
