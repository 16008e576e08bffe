//! Property tests of the record path with arbitrary bytes (DESIGN rule 11): whatever a
//! producer puts in a record's key, value and headers, decoding, dead-letter encoding,
//! reading a letter back and rebuilding it for a redrive never panic, and what the letter
//! says about the record is exact. Broker-free; bounded by proptest's case count, so it runs
//! in the test command in well under a second.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kourier::dead_letter::{Provenance, RedriveRecord};
use kourier::{Codec, DeadLetter, DeadLetterReason, Header, Headers, JsonCodec, RawRecord};
use proptest::prelude::*;

fn bytes() -> impl Strategy<Value = Option<Vec<u8>>> {
    proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64))
}

fn headers() -> impl Strategy<Value = Headers> {
    // Names as kourier's header type carries them today (strings: non-UTF-8 name bytes are
    // issue 14), including names that collide with the provenance headers.
    let name = prop_oneof![
        "[a-z-]{0,12}".prop_map(String::from),
        Just(kourier::dead_letter::headers::ORIGINAL_TOPIC.to_owned()),
        Just(kourier::dead_letter::headers::FAILURE_KIND.to_owned()),
        Just(kourier::dead_letter::headers::REDRIVE_COUNT.to_owned()),
        any::<String>(),
    ];
    proptest::collection::vec((name, bytes()), 0..8).prop_map(|hs| {
        hs.into_iter()
            .map(|(key, value)| Header { key, value })
            .collect()
    })
}

fn record() -> impl Strategy<Value = RawRecord> {
    (
        "[a-z.]{1,20}",
        0..64i32,
        0..i64::MAX,
        bytes(),
        bytes(),
        headers(),
        proptest::option::of(-1..i64::MAX),
        any::<bool>(),
    )
        .prop_map(
            |(topic, partition, offset, key, value, headers, timestamp, log_append_time)| {
                RawRecord {
                    topic,
                    partition,
                    offset,
                    key,
                    value,
                    headers,
                    timestamp,
                    log_append_time,
                }
            },
        )
}

fn reason() -> impl Strategy<Value = DeadLetterReason> {
    prop_oneof![
        Just(DeadLetterReason::Decode),
        Just(DeadLetterReason::Permanent),
        Just(DeadLetterReason::RetriesExhausted),
        Just(DeadLetterReason::Panic),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Decoding arbitrary bytes as JSON is an error or a value, never a panic.
    #[test]
    fn json_decoding_never_panics(record in record()) {
        let _ = JsonCodec::<serde_json::Value>::new().decode(&record);
    }

    /// A dead letter of any record reads back exactly, keeps the record's own headers and
    /// bytes, and rebuilds into a redrive of the original record.
    #[test]
    fn dead_letters_of_arbitrary_records_read_back_exactly(
        record in record(),
        reason in reason(),
        error in any::<String>(),
        attempts in 0..100u32,
    ) {
        let first = UNIX_EPOCH + Duration::from_millis(1_700_000_000_000);
        let mut letter = DeadLetter::new(record.clone(), reason, error.clone());
        letter.attempts = attempts;
        letter.first_failure = first;
        letter.last_failure = SystemTime::now();
        letter.group_id = "g".into();
        let written: Headers = letter.headers().into_iter().collect();
        let p = Provenance::from_headers(&written);
        prop_assert_eq!(p.original_topic.as_deref(), Some(record.topic.as_str()));
        prop_assert_eq!(p.original_partition, Some(record.partition));
        prop_assert_eq!(p.original_offset, Some(record.offset));
        prop_assert_eq!(p.failure_kind, Some(reason));
        prop_assert_eq!(p.attempts, Some(attempts));
        prop_assert_eq!(p.first_failure, Some(first));
        let message = p.error.unwrap_or_default();
        prop_assert!(error.starts_with(&message), "the error is kept (bounded): {:?}", message);

        // Reading it as a letter on a dead-letter topic and rebuilding the original record.
        let on_dlt = RawRecord {
            topic: format!("{}.dlt", record.topic),
            headers: written,
            ..record.clone()
        };
        let redrive = RedriveRecord::from_dead_letter(&on_dlt, None).expect("has a destination");
        prop_assert_eq!(redrive.topic.as_str(), record.topic.as_str());
        prop_assert_eq!(redrive.key.as_deref(), record.key.as_deref());
        prop_assert_eq!(redrive.value.as_deref(), record.value.as_deref());
        // The record's own headers come back in order, byte for byte (provenance names and
        // the redrive count are kourier's: replaced, never duplicated).
        let own = |h: &Headers| -> Vec<Header> {
            h.iter()
                .filter(|h| {
                    !kourier::dead_letter::headers::ALL.contains(&h.key.as_str())
                        && h.key != kourier::dead_letter::headers::REDRIVE_COUNT
                })
                .cloned()
                .collect()
        };
        prop_assert_eq!(own(&redrive.headers), own(&record.headers));
    }

    /// Reading provenance from arbitrary headers (not written by kourier) never panics.
    #[test]
    fn provenance_of_arbitrary_headers_never_panics(headers in headers()) {
        let p = Provenance::from_headers(&headers);
        let _ = p.redrive_count;
    }
}
