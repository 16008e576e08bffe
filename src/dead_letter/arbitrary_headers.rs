//! Arbitrary headers for property tests, one strategy for the crate's unit tests (the
//! dead-letter, redrive and tier readers) and `tests/dlt_tool.rs`, which includes this file
//! with `#[path]`. Compiled only for tests; its parent module brings the names used below
//! into scope (`Header`, `Headers`, `ALL`, `REDRIVE_COUNT`, `tier`).

use proptest::prelude::*;

use super::{ALL, Header, Headers, REDRIVE_COUNT, tier};

/// The names the strategy draws header names from: every name kourier reads, and some
/// others.
pub(crate) fn names() -> Vec<&'static str> {
    let others = [REDRIVE_COUNT, "event-id", "traceparent"];
    ALL.iter()
        .chain(tier::ALL)
        .chain(&others)
        .copied()
        .collect()
}

/// Arbitrary headers, as any producer could write them: known names (or arbitrary bytes)
/// with values that are arbitrary bytes, decimal text of any size, big-endian integers,
/// short text (a failure kind among it), or null.
pub(crate) fn arbitrary_headers() -> impl Strategy<Value = Headers> {
    let name = prop_oneof![
        4 => proptest::sample::select(names()).prop_map(|n| n.as_bytes().to_vec()),
        1 => proptest::collection::vec(any::<u8>(), 0..12),
    ];
    let value = prop_oneof![
        2 => proptest::collection::vec(any::<u8>(), 0..24).prop_map(Some),
        2 => any::<i64>().prop_map(|n| Some(n.to_string().into_bytes())),
        1 => any::<u128>().prop_map(|n| Some(n.to_string().into_bytes())),
        1 => any::<i32>().prop_map(|n| Some(n.to_be_bytes().to_vec())),
        1 => any::<i64>().prop_map(|n| Some(n.to_be_bytes().to_vec())),
        1 => "[ a-z0-9._-]{0,12}".prop_map(|s| Some(s.into_bytes())),
        1 => Just(Some(b"permanent".to_vec())),
        1 => Just(None),
    ];
    proptest::collection::vec((name, value), 0..12).prop_map(|hs| {
        hs.into_iter()
            .map(|(k, v)| match v {
                Some(v) => Header::new(k, v),
                None => Header::null(k),
            })
            .collect()
    })
}
