//! The outage breaker (delivery rule 16 in the crate docs): when the downstream a handler
//! calls is down, records wait instead of using up their attempts and filling the
//! dead-letter topic. `policy` says when it opens and how it probes, `machine` is its state
//! machine (shared by the scheduler, which holds dispatch while it is not closed, and the
//! workers), `gate` is the worker's side (admission before each attempt, the result after),
//! `status` is what the snapshot shows. `destinations` and `destination_machine` are the
//! breakers of destinations (delivery rule 19): the settings, and one small state machine
//! per destination with failures, in a bounded map. It may call only [`stop`](super::stop) (how a
//! waiting record is given up) and the crate's metrics.

mod destination_machine;
mod destinations;
mod gate;
mod machine;
mod policy;
mod status;

pub(crate) use self::destination_machine::{
    Denied, DestinationBreakers, DestinationMemo, DestinationPass, Held,
};
pub use self::destination_machine::{DestinationStatus, DestinationsStatus};
pub(crate) use self::destinations::Destination;
pub use self::destinations::{Destinations, GoneRecords};
pub(crate) use self::gate::*;
pub(crate) use self::machine::*;
pub use self::policy::BreakerPolicy;
pub use self::status::{BreakerState, BreakerStatus, BreakerTransition};
