//! `Provenance::from_headers` and `RedriveRecord::from_dead_letter` on any headers: no panic,
//! and what they read keeps the documented rules (`dead_letter::headers`, "Reading them back").
#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use kourier::dead_letter::{Provenance, RedriveRecord, headers as dlt};
use kourier_fuzz::Input;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: Input| {
    let headers = input.headers();
    let p = Provenance::from_headers(&headers);
    let latest = UNIX_EPOCH + Duration::from_millis(dlt::MAX_TIME_MS as u64);
    assert!(p.original_partition.is_none_or(|x| x >= 0));
    assert!(p.original_offset.is_none_or(|x| x >= 0));
    assert!(
        p.original_timestamp
            .is_none_or(|t| (0..=dlt::MAX_TIME_MS).contains(&t))
    );
    assert!(p.first_failure.is_none_or(|t| t <= latest));
    assert!(p.last_failure.is_none_or(|t| t <= latest));
    // A redrive count header that is present never reads as 0 unless it says 0.
    let present = headers
        .iter()
        .rev()
        .find(|h| h.is_named(dlt::REDRIVE_COUNT));
    match present {
        None => assert_eq!(p.redrive_count, 0),
        Some(h) => {
            let says_zero = h
                .value()
                .and_then(|v| std::str::from_utf8(v).ok())
                .map(str::trim)
                .is_some_and(|t| !t.is_empty() && t.bytes().all(|b| b == b'0'));
            assert!(says_zero || p.redrive_count > 0, "{h:?} read as 0");
        }
    }
    let _ = p.original_coordinates();

    let letter = input.record("t.dlt");
    match RedriveRecord::from_dead_letter(&letter, input.destination.as_deref()) {
        Ok(r) => {
            assert_eq!(r.redrive_count, p.redrive_count.saturating_add(1));
            assert_eq!(r.headers.get_all(dlt::REDRIVE_COUNT).count(), 1);
            assert!(!r.topic.is_empty() && r.topic.len() <= 249);
            assert!(
                r.headers
                    .iter()
                    .all(|h| !dlt::ALL.iter().any(|n| h.is_named(n)))
            );
        }
        Err(e) => {
            assert!(e.to_string().len() < 1_000);
        }
    }
});
