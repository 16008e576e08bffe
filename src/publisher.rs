//! Typed keyed publisher (to be written).
