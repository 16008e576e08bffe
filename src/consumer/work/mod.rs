//! A record's life on a worker (`worker`: read it, then try it — breaker, claim, admission,
//! attempt — until it ends): its claims in the store (`claim`), how a record given up is
//! dead-lettered or forwarded and its delivery settled (`settle`), its retry-tier steps
//! (`tiers`: due time, the key-order ledger, forwards), how it waits without its slot
//! (`waits`; for its destination: `destination`), and how it ended (`outcome`). It calls the plug-ins (codec, handler,
//! store, sink, ledger), the breaker and the dedup room; it reports to the scheduler only
//! through its slot and the job's end.

mod claim;
mod destination;
mod outcome;
mod settle;
mod tiers;
mod waits;
mod worker;

pub(crate) use self::destination::DestinationGate;
pub use self::outcome::RecordOutcome;
pub(crate) use self::outcome::*;
pub(crate) use self::waits::*;
pub(crate) use self::worker::*;
