//! The `kourier-dlt` tool's reading and formatting of a letter (its own source, compiled in)
//! on any headers, key and timestamp: no panic, one table row per letter, JSON that
//! serialises.
#![no_main]

#[allow(dead_code, unused_imports)]
#[path = "../../src/bin/kourier-dlt/dlt.rs"]
mod dlt;

use std::time::{Duration, UNIX_EPOCH};

use kourier::DeadLetterReason;
use kourier_fuzz::Input;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: Input| {
    let letter = dlt::Letter::new(input.record("t.dlt"));
    let table = dlt::table(std::slice::from_ref(&letter));
    assert_eq!(table.lines().count(), 2, "{table}");
    assert!(serde_json::to_string(&letter.to_json()).is_ok());
    let _ = (
        letter.failed_at(),
        letter.tier(),
        letter.place(),
        letter.key_text(),
    );
    let (since, until, _) = input.knobs;
    let filter = dlt::Filter {
        kinds: vec![DeadLetterReason::Permanent],
        since: Some(UNIX_EPOCH + Duration::from_millis(since >> 1)),
        until: Some(UNIX_EPOCH + Duration::from_millis(until >> 1)),
        key: input.key.clone(),
    };
    let _ = filter.matches(&letter);
});
