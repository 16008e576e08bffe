//! The outage breaker (delivery rule 16 in the crate docs): when the downstream a handler
//! calls is down, records wait instead of using up their attempts and filling the
//! dead-letter topic. It owns the breaker's policy, its state machine and the gate workers
//! pass before each attempt; it may call only [`stop`](super::stop) (how a waiting record is
//! given up) and the crate's metrics.

mod machine;

pub(crate) use self::machine::*;
pub use self::machine::{BreakerPolicy, BreakerState, BreakerStatus, BreakerTransition};
