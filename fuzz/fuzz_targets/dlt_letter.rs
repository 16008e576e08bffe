//! The `kourier-dlt` tool's reading and formatting of a letter (its own source, compiled in)
//! on any headers, key and timestamp: no panic, one table row per letter, JSON that
//! serialises.
#![no_main]

#[allow(dead_code, unused_imports)]
#[path = "../../src/bin/kourier-dlt/dlt.rs"]
mod dlt;

use std::time::{Duration, UNIX_EPOCH};

use kourier::DeadLetterReason;
use kourier::dead_letter::LetterSelector;
use kourier_fuzz::Input;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: Input| {
    let letter = dlt::Letter::new(input.record("t.dlt"));
    let table = dlt::table(std::slice::from_ref(&letter));
    assert_eq!(table.lines().count(), 2, "{table}");
    assert!(serde_json::to_string(&letter.to_json()).is_ok());
    let _ = (letter.tier(), letter.place(), letter.key_text());
    let (since, until, _) = input.knobs;
    let mut filter = LetterSelector::new()
        .kind(DeadLetterReason::Permanent)
        .header("event-id", "e-1")
        .since(UNIX_EPOCH + Duration::from_millis(since >> 1))
        .until(UNIX_EPOCH + Duration::from_millis(until >> 1));
    if let Some(key) = &input.key {
        filter = filter.key(key);
    }
    let _ = filter.matches(&letter.record);
    let by = dlt::GroupBy::Header("event-id".into());
    let groups = dlt::group(std::slice::from_ref(&letter), &by);
    let table = dlt::grouped_table(&groups, &by);
    assert_eq!(table.lines().count(), 2, "{table}");
});
