//! The consumer's reading of a retry-tier record (`kourier::__bench::read_tier_record`, the
//! function `Tiers::locate` calls) on any headers, timestamp, delay and clock: no panic, and
//! what it reads keeps the rules of the `tiers` module docs ("Headers are untrusted").
//!
//! `kourier::__bench` exists only when kourier is built with `--cfg kourier_bench`:
//! `RUSTFLAGS="--cfg kourier_bench" cargo +nightly fuzz run tier_record`.
#![no_main]

#[cfg(not(kourier_bench))]
compile_error!(
    "the tier_record target needs kourier's crate-private parts: \
     RUSTFLAGS=\"--cfg kourier_bench\" cargo +nightly fuzz run tier_record"
);

use std::time::{Duration, UNIX_EPOCH};

use kourier::__bench::read_tier_record;
use kourier_fuzz::Input;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: Input| {
    let (delay_ms, now_s, tiers) = input.knobs;
    let delay = Duration::from_millis(delay_ms % (400 * 86_400_000) + 1);
    let now = UNIX_EPOCH + Duration::from_secs(now_s % 10_000_000_000);
    let tiers = u32::from(tiers % 100) + 1;
    let tier = tiers.min(2);
    let record = input.record("src.retry.2");
    let r = read_tier_record(&record, "src", tier, tiers, delay, now);
    assert_eq!(r.origin.0, "src");
    assert!(r.longest_wait <= delay + delay.min(Duration::from_secs(60)));
    match &r.invalid {
        Some(why) => {
            assert!(r.due.is_none());
            assert!(why.len() < 1_000, "unbounded message: {} bytes", why.len());
            assert_eq!((r.origin.1, r.origin.2), (record.partition, record.offset));
        }
        None => {
            let due = r.due.expect("a valid tier record has a due time");
            assert!(
                due <= now + r.longest_wait,
                "due past now + {:?}",
                r.longest_wait
            );
            if let Some(ts) = record
                .timestamp
                .filter(|t| (0..=253_402_300_799_999).contains(t))
            {
                let ts = UNIX_EPOCH + Duration::from_millis(ts as u64);
                assert!(due <= ts + r.longest_wait, "due past timestamp + wait");
            }
            assert!(r.origin.1 >= 0 && r.origin.2 >= 0);
            assert!(r.stages.is_none_or(|s| s <= tiers));
        }
    }
});
