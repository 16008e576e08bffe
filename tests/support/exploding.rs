//! An event whose drop panics once, for id 5: a panic that escapes kourier's guards (they
//! catch the codec's, the handler's and the stores'), like a bug in a worker, so its record
//! is given up outside any drain and its partition is reset to the commit point.

use std::sync::atomic::{AtomicBool, Ordering};

use serde::Deserialize;

/// See the module docs.
#[derive(Debug)]
pub(crate) struct Exploding {
    pub(crate) id: u64,
}

/// Whether event 5 has yet to explode (once per test binary).
pub(crate) static ARMED: AtomicBool = AtomicBool::new(true);

#[derive(Deserialize)]
struct Id {
    id: u64,
}

impl<'de> Deserialize<'de> for Exploding {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Id::deserialize(d).map(|e| Exploding { id: e.id })
    }
}

impl Drop for Exploding {
    fn drop(&mut self) {
        if self.id == 5 && ARMED.swap(false, Ordering::SeqCst) {
            panic!("event 5 explodes when dropped");
        }
    }
}
