//! Header names are bytes from end to end (issue 14), against the real broker: a record whose
//! header names are not UTF-8 (`c3 28 78`, `ff fe`), empty, or hold a NUL byte — produced
//! through the Kafka protocol directly, since rdkafka's producer cannot write such names —
//! reaches the handler byte for byte; a permanent failure dead-letters it with the same names
//! and values, in order, duplicates and null values kept; and a redrive of that letter
//! publishes them byte for byte again.
//!
//! The producer here is independent of kourier (tests/support/raw_produce.rs writes the
//! record batch by hand), so the handler's view checks kourier's reading; the dead letter and
//! the redrive, read back the same way, check its writing.
//!
//! Needs Kafka (`scripts/services up`); each test has its own topics and group.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kourier::dead_letter::{Provenance, RedriveRecord, headers};
use kourier::{
    DeadLetterReason, HandlerError, Header, Headers, Message, Publisher, RawRecord, handler_fn,
};

use crate::support::RawHeader;
use crate::support::consumer::Running;

const WAIT: Duration = Duration::from_secs(60);

/// Names and values no `&str` API can carry, in an order that matters, with a duplicate.
fn odd_headers() -> Vec<RawHeader> {
    vec![
        (b"\xc3\x28\x78".to_vec(), Some(b"first".to_vec())),
        (b"\xff\xfe".to_vec(), Some(vec![0xff, 0x00, 0xfe])),
        (Vec::new(), Some(b"empty name".to_vec())),
        (b"a\0b".to_vec(), None),
        (b"\xc3\x28\x78".to_vec(), Some(b"second".to_vec())),
        (b"\0".to_vec(), Some(Vec::new())),
        (b"event-id".to_vec(), Some(b"e-1".to_vec())),
    ]
}

fn as_headers(raw: &[RawHeader]) -> Headers {
    raw.iter()
        .map(|(key, value)| Header {
            key: key.clone().into(),
            value: value.clone().map(Into::into),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_name_bytes_survive_handler_dead_letter_and_redrive() {
    let (topic, group, dlt_topic) = support::consumer::setup("hdr-bytes", 1).await;
    let produced = odd_headers();
    let expected = as_headers(&produced);
    let value = br#"{"id":1}"#;
    let offset = support::produce_raw(&topic, Some(b"k-1"), Some(value), &produced).await;

    // The handler sees the exact bytes, then refuses the record for good.
    let seen: Arc<Mutex<Vec<Headers>>> = Arc::default();
    let handler = {
        let seen = Arc::clone(&seen);
        handler_fn(move |m: Message<serde_json::Value>| {
            let seen = Arc::clone(&seen);
            async move {
                seen.lock().unwrap().push(m.headers().clone());
                Err::<(), _>(HandlerError::permanent("refused on purpose"))
            }
        })
    };
    let consumer = Running::start(support::consumer::builder(handler, &topic, &group));
    let letters = support::read_at_least(&dlt_topic, 1, WAIT).await;
    consumer.stop().await;

    assert_eq!(
        *seen.lock().unwrap(),
        std::slice::from_ref(&expected),
        "the handler's view"
    );

    // The dead letter: same key and value, the record's own headers first, byte for byte,
    // then provenance.
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter.key.as_deref(), Some(&b"k-1"[..]));
    assert_eq!(letter.value.as_deref(), Some(&value[..]));
    let own: Headers = letter
        .raw_headers
        .iter()
        .take(expected.len())
        .cloned()
        .collect();
    assert_eq!(own, expected, "the dead letter's own headers");
    assert_eq!(
        letter.raw_headers.len(),
        expected.len() + headers::ALL.len() - 3,
        "then the provenance headers (no dropped-bytes markers), nothing else"
    );
    let p = Provenance::from_headers(&letter.raw_headers);
    assert_eq!(p.original_topic.as_deref(), Some(topic.as_str()));
    assert_eq!(p.original_offset, Some(offset));
    assert_eq!(p.failure_kind, Some(DeadLetterReason::Permanent));

    // The redrive of that letter, published with the library, reads back byte for byte.
    let redrive_topic = support::new_topic("hdr-bytes-redrive", 1).await;
    let on_dlt = RawRecord::builder(&dlt_topic)
        .partition(letter.partition)
        .offset(letter.offset)
        .key(letter.key.clone().unwrap())
        .value(letter.value.clone().unwrap())
        .headers(letter.raw_headers.clone())
        .build();
    let redrive = RedriveRecord::from_dead_letter(&on_dlt, Some(&redrive_topic)).unwrap();
    let publisher: Publisher<serde_json::Value> =
        Publisher::builder(support::bootstrap(), &redrive_topic)
            .build()
            .expect("publisher");
    publisher
        .send_raw(
            redrive.key.as_deref(),
            redrive.value.as_deref(),
            redrive.headers.clone(),
        )
        .await
        .expect("redrive");
    publisher
        .flush(Duration::from_secs(10))
        .await
        .expect("flush");

    let redriven = support::read_at_least(&redrive_topic, 1, WAIT).await;
    assert_eq!(redriven.len(), 1);
    let mut expected_redrive = expected.clone();
    expected_redrive.push(Header::new(headers::REDRIVE_COUNT, "1"));
    expected_redrive.push(Header::new(
        headers::REDRIVEN_FROM,
        format!("{dlt_topic}/{}@{}", letter.partition, letter.offset),
    ));
    assert_eq!(
        redriven[0].raw_headers, expected_redrive,
        "the redriven record"
    );
    assert_eq!(redriven[0].key.as_deref(), Some(&b"k-1"[..]));
    assert_eq!(redriven[0].value.as_deref(), Some(&value[..]));
}

/// A record whose *only* header has a NUL in its name and a null value: the one case where
/// librdkafka's string API gives no hint of the name's real length.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_in_a_null_valued_name_is_kept() {
    let topic = support::new_topic("hdr-bytes-nul", 1).await;
    let produced: Vec<RawHeader> = vec![(b"trace\0id".to_vec(), None)];
    support::produce_raw(&topic, None, None, &produced).await;
    let read = support::read_all(&topic).await;
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].raw_headers, as_headers(&produced));
    assert_eq!(read[0].value, None);
}
