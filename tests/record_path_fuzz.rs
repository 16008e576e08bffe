//! Property tests of the record path with arbitrary bytes (delivery rule 11 in the crate docs): whatever a
//! producer puts in a record's key, value and headers (header *names* included: any bytes,
//! empty, NUL, not UTF-8), decoding, dead-letter encoding, writing headers through
//! librdkafka and reading them back, and rebuilding a letter for a redrive never panic, and
//! what the letter says about the record is exact, byte for byte. Broker-free; bounded by proptest's case count, so it runs
//! in the test command in well under a second.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kourier::dead_letter::{Provenance, RedriveRecord};
use kourier::{Codec, DeadLetter, DeadLetterReason, Header, Headers, JsonCodec, RawRecord};
use proptest::prelude::*;

fn bytes() -> impl Strategy<Value = Option<Vec<u8>>> {
    proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64))
}

fn headers() -> impl Strategy<Value = Headers> {
    // Names are bytes: ordinary text, names that collide with the provenance headers, any
    // Unicode, and any bytes at all (not UTF-8, empty, NUL inside or at the end).
    let name = prop_oneof![
        "[a-z-]{0,12}".prop_map(String::into_bytes),
        Just(
            kourier::dead_letter::headers::ORIGINAL_TOPIC
                .as_bytes()
                .to_vec()
        ),
        Just(
            kourier::dead_letter::headers::FAILURE_KIND
                .as_bytes()
                .to_vec()
        ),
        Just(
            kourier::dead_letter::headers::REDRIVE_COUNT
                .as_bytes()
                .to_vec()
        ),
        any::<String>().prop_map(String::into_bytes),
        proptest::collection::vec(any::<u8>(), 0..16),
        Just(b"\xc3\x28\x78".to_vec()),
        Just(b"\xff\xfe".to_vec()),
        Just(b"a\0b".to_vec()),
        Just(Vec::new()),
    ];
    proptest::collection::vec((name, bytes()), 0..8).prop_map(|hs| {
        hs.into_iter()
            .map(|(key, value)| Header {
                key: key.into(),
                value: value.map(Into::into),
            })
            .collect()
    })
}

/// `headers` written into librdkafka's header list (what a produced record carries) and
/// read back out of it (what the consumer does with a record's list).
fn through_librdkafka(headers: &Headers) -> Headers {
    Headers::from(&headers.to_rdkafka())
}

fn record() -> impl Strategy<Value = RawRecord> {
    (
        // A valid topic name (Kafka refuses `.` and `..`; a redrive refuses to publish there).
        "[a-z][a-z.]{0,19}",
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
                let mut record = RawRecord::builder(topic)
                    .partition(partition)
                    .offset(offset)
                    .headers(headers)
                    .build();
                record.key = key.map(Into::into);
                record.value = value.map(Into::into);
                record.timestamp = timestamp;
                record.log_append_time = log_append_time;
                record
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
        // The headers as the Kafka sink hands them to librdkafka, read back the way the
        // consumer reads a record's headers.
        let written: Headers = letter.headers().into_iter().collect();
        let written = through_librdkafka(&written);
        let p = Provenance::from_headers(&written);
        prop_assert_eq!(p.original_topic.as_deref(), Some(&*record.topic));
        prop_assert_eq!(p.original_partition, Some(record.partition));
        prop_assert_eq!(p.original_offset, Some(record.offset));
        prop_assert_eq!(p.failure_kind, Some(reason));
        prop_assert_eq!(p.attempts, Some(attempts));
        prop_assert_eq!(p.first_failure, Some(first));
        let message = p.error.unwrap_or_default();
        prop_assert!(error.starts_with(&message), "the error is kept (bounded): {:?}", message);

        // Reading it as a letter on a dead-letter topic and rebuilding the original record.
        let mut on_dlt = record.clone();
        on_dlt.topic = format!("{}.dlt", record.topic).into();
        on_dlt.headers = written;
        let redrive = RedriveRecord::from_dead_letter(&on_dlt, None).expect("has a destination");
        prop_assert_eq!(redrive.topic.as_str(), &*record.topic);
        prop_assert_eq!(redrive.key.as_deref(), record.key.as_deref());
        prop_assert_eq!(redrive.value.as_deref(), record.value.as_deref());
        // The record's own headers come back in order, byte for byte (provenance names and
        // the redrive count and where it was redriven from are kourier's: replaced, never
        // duplicated).
        let own = |h: &Headers| -> Vec<Header> {
            h.iter()
                .filter(|h| {
                    !kourier::dead_letter::headers::ALL.iter().any(|n| h.is_named(n))
                        && !h.is_named(kourier::dead_letter::headers::REDRIVE_COUNT)
                        && !h.is_named(kourier::dead_letter::headers::REDRIVEN_FROM)
                })
                .cloned()
                .collect()
        };
        prop_assert_eq!(own(&redrive.headers), own(&record.headers));
        // And the redrive, as it is produced and consumed again.
        prop_assert_eq!(own(&through_librdkafka(&redrive.headers)), own(&record.headers));
    }

    /// Any headers written through librdkafka (as the sink, the publisher and the redrive
    /// tool write them) read back identical: names and values byte for byte, order and
    /// duplicates kept, null values null.
    #[test]
    fn headers_round_trip_through_librdkafka(headers in headers()) {
        prop_assert_eq!(through_librdkafka(&headers), headers);
    }

    /// Reading provenance from arbitrary headers (not written by kourier) never panics.
    #[test]
    fn provenance_of_arbitrary_headers_never_panics(headers in headers()) {
        let p = Provenance::from_headers(&headers);
        let _ = p.redrive_count;
    }
}
