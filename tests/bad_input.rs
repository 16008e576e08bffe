//! Bad input against the real broker, beyond what tests/consumer.rs covers (invalid JSON, wrong
//! schema, null and empty values, null and binary keys, odd headers, 2,000 headers): values
//! too large for the dead-letter topic, thousands of headers on a dead letter, a dead letter
//! redriven again and again, 64 KiB keys, and JSON of the wrong type.
//!
//! In every case the consumer keeps running (it stops cleanly at the end), each record ends
//! handled or dead-lettered as documented, and the committed offset reaches the end.
//!
//! Needs Kafka (`scripts/services up`); each test has its own topics and group.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kourier::dead_letter::headers as dlt;
use kourier::{
    Handler, HandlerError, Message, ProcessingOrder, RetryPolicy, RetryingConsumerBuilder,
    async_trait,
};
use serde::{Deserialize, Serialize};
use support::consumer::{self, Running, wait_until};
use support::{ReadRecord, TestRecord};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Ev {
    id: u64,
    #[serde(default)]
    permanent: bool,
    #[serde(default)]
    pad: String,
}

impl Ev {
    fn ok(id: u64) -> Ev {
        Ev {
            id,
            permanent: false,
            pad: String::new(),
        }
    }

    fn permanent(id: u64) -> Ev {
        Ev {
            permanent: true,
            ..Ev::ok(id)
        }
    }

    fn bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap()
    }
}

/// What the handler saw of one successful call.
#[derive(Debug, Clone)]
struct Seen {
    id: u64,
    key: Option<Vec<u8>>,
}

/// Succeeds, or fails permanently when the event says so; records every success.
#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<Vec<Seen>>>,
    calls: Arc<Mutex<Vec<u64>>>,
}

impl Recorder {
    fn ids(&self) -> Vec<u64> {
        self.seen.lock().unwrap().iter().map(|s| s.id).collect()
    }
    fn calls(&self) -> Vec<u64> {
        self.calls.lock().unwrap().clone()
    }
}

#[async_trait]
impl Handler for Recorder {
    type Event = Ev;
    async fn handle(&self, m: &Message<Ev>) -> Result<(), HandlerError> {
        let ev = m.event();
        self.calls.lock().unwrap().push(ev.id);
        if ev.permanent {
            return Err(HandlerError::permanent(format!(
                "event {} is permanently bad",
                ev.id
            )));
        }
        self.seen.lock().unwrap().push(Seen {
            id: ev.id,
            key: m.key().map(<[u8]>::to_vec),
        });
        Ok(())
    }
}

fn builder(recorder: &Recorder, topic: &str, group: &str) -> RetryingConsumerBuilder<Recorder> {
    consumer::builder(recorder.clone(), topic, group)
        .retry_policy(RetryPolicy::fixed(Duration::from_millis(50), 2))
}

async fn committed(group: &str, topic: &str) -> i64 {
    support::committed_sum(group, topic, 1).await
}

/// A one-partition topic, a group, and a one-partition dead-letter topic with `dlt_configs`.
async fn setup(name: &str, dlt_configs: &[(&str, &str)]) -> (String, String, String) {
    consumer::setup_with_dlt_config(name, 1, dlt_configs).await
}

fn original_offset(r: &ReadRecord) -> i64 {
    let bytes = r.header(dlt::ORIGINAL_OFFSET).flatten().unwrap();
    i64::from_be_bytes(bytes.try_into().unwrap())
}

fn count_named(r: &ReadRecord, name: &str) -> usize {
    r.headers.iter().filter(|(k, _)| k == name).count()
}

/// The provenance headers a letter whose value was kept carries (all but the markers of
/// dropped parts).
fn provenance_names() -> Vec<&'static str> {
    dlt::ALL
        .iter()
        .copied()
        .filter(|h| {
            ![
                dlt::VALUE_DROPPED_BYTES,
                dlt::KEY_DROPPED_BYTES,
                dlt::HEADERS_DROPPED,
            ]
            .contains(h)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_too_large_for_the_dead_letter_topic_become_metadata_only_letters() {
    // The dead-letter topic takes at most 20 kB per record batch; the source records are
    // ten times that.
    let (topic, group, dlt_topic) = setup("oversize", &[("max.message.bytes", "20000")]).await;
    let big_permanent = Ev {
        pad: "x".repeat(200_000),
        ..Ev::permanent(1)
    }
    .bytes();
    let big_poison = vec![0xffu8; 150_000]; // not JSON: a decode failure
    support::produce(
        &topic,
        vec![
            TestRecord::new()
                .key(b"k1")
                .value(&big_permanent)
                .header("trace", Some(b"t-1".to_vec())),
            TestRecord::new()
                .key(b"k2")
                .value(&big_poison)
                .header("trace", Some(b"t-2".to_vec())),
            TestRecord::new().key(b"k3").value(Ev::ok(3).bytes()),
        ],
    )
    .await;

    let recorder = Recorder::default();
    let c = Running::start(builder(&recorder, &topic, &group));
    wait_until(
        "the record after them handled and all committed",
        Duration::from_secs(90),
        || async { recorder.ids() == vec![3] && committed(&group, &topic).await == 3 },
    )
    .await;
    c.stop().await;

    let letters = support::read_all(&dlt_topic).await;
    // What the topic holds, readable even if a letter lacks its headers.
    let seen: Vec<_> = letters
        .iter()
        .map(|l| {
            let kind = l.header(dlt::FAILURE_KIND).flatten();
            let kind = kind.map(|k| String::from_utf8_lossy(k).into_owned());
            (l.offset, kind, l.value.as_ref().map(Vec::len))
        })
        .collect();
    assert_eq!(
        letters.len(),
        2,
        "one letter per oversized record: {seen:?}"
    );
    for (letter, (offset, key, size, kind, trace)) in letters.iter().zip([
        (0, &b"k1"[..], big_permanent.len(), "permanent", &b"t-1"[..]),
        (1, &b"k2"[..], big_poison.len(), "decode", &b"t-2"[..]),
    ]) {
        assert_eq!(original_offset(letter), offset);
        assert_eq!(letter.value, None, "metadata-only: the value is dropped");
        assert_eq!(letter.key.as_deref(), Some(key), "the key is kept");
        assert_eq!(
            letter.header_str(dlt::VALUE_DROPPED_BYTES),
            size.to_string()
        );
        assert_eq!(letter.header_str(dlt::FAILURE_KIND), kind);
        assert_eq!(letter.header_str(dlt::ORIGINAL_TOPIC), topic);
        assert_eq!(letter.header("trace"), Some(Some(trace)), "headers kept");
    }
    assert_eq!(
        recorder.calls(),
        vec![1, 3],
        "the poison pill never reached the handler"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_carries_thousands_of_headers_unchanged() {
    let (topic, group, dlt_topic) = setup("many-headers-dlt", &[]).await;
    let mut record = TestRecord::new().key(b"k").value(Ev::permanent(1).bytes());
    for i in 0..5_000 {
        record = record.header(format!("h{i:04}"), Some(format!("v{i}").into_bytes()));
    }
    // Repeated names, a null value and a binary value among them.
    record = record
        .header("dup", Some(b"first".to_vec()))
        .header("dup", Some(b"second".to_vec()))
        .header("null", None)
        .header("bin", Some(vec![0, 0xff, 0xfe]));
    let sent_headers = record.headers.clone();
    support::produce(
        &topic,
        vec![record, TestRecord::new().key(b"k").value(Ev::ok(2).bytes())],
    )
    .await;

    let recorder = Recorder::default();
    let c = Running::start(builder(&recorder, &topic, &group));
    wait_until("both records settled", Duration::from_secs(60), || async {
        recorder.ids() == vec![2] && committed(&group, &topic).await == 2
    })
    .await;
    c.stop().await;

    let letters = support::read_all(&dlt_topic).await;
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    let (original, provenance) = letter.headers.split_at(sent_headers.len());
    assert_eq!(original, &sent_headers[..], "every header kept, in order");
    let mut names: Vec<&str> = provenance.iter().map(|(k, _)| k.as_str()).collect();
    names.sort_unstable();
    let mut expected = provenance_names();
    expected.sort_unstable();
    assert_eq!(names, expected, "then the provenance headers, once each");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_redriven_five_times_keeps_the_same_headers() {
    let (topic, group, dlt_topic) = setup("redrive", &[]).await;
    let user_headers = vec![
        ("trace".to_owned(), Some(b"abc".to_vec())),
        ("tenant".to_owned(), Some(b"t-1".to_vec())),
        ("nothing".to_owned(), None),
    ];
    let mut first = TestRecord::new()
        .key(b"user-7")
        .value(Ev::permanent(7).bytes());
    for (k, v) in &user_headers {
        first = first.header(k.clone(), v.clone());
    }
    support::produce(&topic, vec![first]).await;

    let recorder = Recorder::default();
    let c = Running::start(builder(&recorder, &topic, &group));
    let mut letters: Vec<ReadRecord> = Vec::new();
    for redrive in 0..=5u32 {
        let want = redrive as usize + 1;
        wait_until(
            &format!("dead letter #{want}"),
            Duration::from_secs(60),
            || async { support::read_all(&dlt_topic).await.len() >= want },
        )
        .await;
        letters = support::read_all(&dlt_topic).await;
        assert_eq!(letters.len(), want, "one letter per failure, no more");
        if redrive == 5 {
            break;
        }
        // Redrive as a tool would: the letter's key, value and *all* its headers back to the
        // source topic, with the redrive count set to the next number.
        let letter = letters.last().unwrap();
        let mut again = TestRecord::new().key(letter.key.clone().unwrap());
        again.value = letter.value.clone();
        for (k, v) in &letter.headers {
            if k != dlt::REDRIVE_COUNT {
                again = again.header(k.clone(), v.clone());
            }
        }
        again = again.header(
            dlt::REDRIVE_COUNT,
            Some((redrive + 1).to_string().into_bytes()),
        );
        support::produce(&topic, vec![again]).await;
    }
    wait_until(
        "all six failures committed",
        Duration::from_secs(30),
        || async { committed(&group, &topic).await == 6 },
    )
    .await;
    c.stop().await;
    assert_eq!(
        recorder.calls(),
        vec![7; 6],
        "the handler ran once per delivery"
    );

    let provenance = provenance_names();
    for (generation, letter) in letters.iter().enumerate() {
        let redrives = generation; // letter n failed after n redrives
        // The user's headers, once each, in their order; then provenance, once each; plus the
        // redrive count once redriven.
        let users: Vec<(String, Option<Vec<u8>>)> = letter
            .headers
            .iter()
            .filter(|(k, _)| !dlt::ALL.contains(&k.as_str()) && k != dlt::REDRIVE_COUNT)
            .cloned()
            .collect();
        assert_eq!(users, user_headers, "letter {generation}: user headers");
        for name in &provenance {
            assert_eq!(
                count_named(letter, name),
                1,
                "letter {generation}: {name} once, replaced rather than appended"
            );
        }
        assert_eq!(count_named(letter, dlt::VALUE_DROPPED_BYTES), 0);
        let expected_len = user_headers.len() + provenance.len() + usize::from(redrives > 0);
        assert_eq!(
            letter.headers.len(),
            expected_len,
            "letter {generation}: headers do not grow ({:?})",
            letter.headers.iter().map(|(k, _)| k).collect::<Vec<_>>()
        );
        if redrives > 0 {
            assert_eq!(letter.header_str(dlt::REDRIVE_COUNT), redrives.to_string());
        } else {
            assert_eq!(count_named(letter, dlt::REDRIVE_COUNT), 0);
        }
        // The provenance is about the latest failure: the redriven record's own offset.
        assert_eq!(original_offset(letter), generation as i64);
        assert_eq!(letter.header_str(dlt::FAILURE_KIND), "permanent");
        assert_eq!(letter.header_str(dlt::ATTEMPTS), "1");
        assert_eq!(letter.key.as_deref(), Some(&b"user-7"[..]));
        assert_eq!(letter.value, Some(Ev::permanent(7).bytes()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_of_64_kib_are_handled_in_key_order_and_dead_lettered_intact() {
    let (topic, group, dlt_topic) = setup("bigkey", &[]).await;
    let text_key: Vec<u8> = (0..65_536u32).map(|i| b'a' + (i % 26) as u8).collect();
    let binary_key: Vec<u8> = (0..65_536u32).map(|i| (i % 256) as u8).collect();
    support::produce(
        &topic,
        vec![
            TestRecord::new().key(&text_key).value(Ev::ok(1).bytes()),
            TestRecord::new()
                .key(&binary_key)
                .value(Ev::permanent(2).bytes()),
            TestRecord::new().key(&text_key).value(Ev::ok(3).bytes()),
            TestRecord::new().key(&binary_key).value(Ev::ok(4).bytes()),
        ],
    )
    .await;

    let recorder = Recorder::default();
    let c = Running::start(builder(&recorder, &topic, &group).ordering(ProcessingOrder::Key));
    wait_until(
        "all handled and committed",
        Duration::from_secs(60),
        || async { recorder.ids().len() == 3 && committed(&group, &topic).await == 4 },
    )
    .await;
    c.stop().await;

    let seen = recorder.seen.lock().unwrap().clone();
    let of = |key: &[u8]| -> Vec<u64> {
        seen.iter()
            .filter(|s| s.key.as_deref() == Some(key))
            .map(|s| s.id)
            .collect()
    };
    assert_eq!(
        of(&text_key),
        vec![1, 3],
        "the 64 KiB key reached the handler intact, in order"
    );
    assert_eq!(of(&binary_key), vec![4]);
    let letters = support::read_all(&dlt_topic).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(
        letters[0].key.as_deref(),
        Some(&binary_key[..]),
        "key kept byte for byte"
    );
    assert_eq!(original_offset(&letters[0]), 1);
}

/// When even a metadata-only letter is too large (here: its 64 KiB key), the sink writes a
/// provenance-only letter (no key, no value, no original headers, the dropped sizes in
/// headers) instead of retrying forever: the partition moves on and everything is committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_too_large_for_the_dead_letter_topic_leaves_a_provenance_only_letter() {
    let (topic, group, dlt_topic) = setup("bigkey-dlt", &[("max.message.bytes", "10000")]).await;
    let key = vec![b'k'; 65_536];
    support::produce(
        &topic,
        vec![
            TestRecord::new().key(b"small").value(Ev::ok(1).bytes()),
            TestRecord::new()
                .key(&key)
                .value(Ev::permanent(2).bytes())
                .header("trace", Some(b"abc".to_vec())),
            TestRecord::new().key(b"small").value(Ev::ok(3).bytes()),
        ],
    )
    .await;

    let recorder = Recorder::default();
    let c = Running::start(builder(&recorder, &topic, &group));
    wait_until("everything settled", Duration::from_secs(60), || async {
        recorder.ids() == vec![1, 3] && committed(&group, &topic).await == 3
    })
    .await;
    c.assert_alive();
    c.stop().await;
    let letters = support::read_all(&dlt_topic).await;
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter.key, None, "the key did not fit");
    assert_eq!(letter.value, None, "nor did the value");
    assert_eq!(original_offset(letter), 1);
    let text = |name: &str| {
        letter
            .header(name)
            .flatten()
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    assert_eq!(text(dlt::KEY_DROPPED_BYTES).as_deref(), Some("65536"));
    assert_eq!(text(dlt::HEADERS_DROPPED).as_deref(), Some("1"));
    assert_eq!(
        text(dlt::VALUE_DROPPED_BYTES),
        Some(Ev::permanent(2).bytes().len().to_string())
    );
    assert_eq!(text(dlt::FAILURE_KIND).as_deref(), Some("permanent"));
    assert_eq!(
        letter.header("trace"),
        None,
        "the record's own headers were dropped"
    );
    assert_eq!(recorder.calls(), vec![1, 2, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_json_of_the_wrong_type_is_dead_lettered_as_a_poison_pill() {
    let (topic, group, dlt_topic) = setup("wrong-type", &[]).await;
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let bad: Vec<Vec<u8>> = vec![
        b"[1,2,3]".to_vec(),
        b"42".to_vec(),
        br#""a string""#.to_vec(),
        b"null".to_vec(), // JSON null, not a null record value
        b"true".to_vec(),
        br#"{"id":"seven"}"#.to_vec(),
        br#"{"id":-1}"#.to_vec(),
        br#"{"id":1e400}"#.to_vec(),
        br#"{"id":1} trailing"#.to_vec(),
        deep.into_bytes(), // nested past serde_json's recursion limit: an error, no overflow
    ];
    let mut records: Vec<TestRecord> = bad
        .iter()
        .map(|v| TestRecord::new().key(b"k").value(v))
        .collect();
    records.push(TestRecord::new().key(b"k").value(Ev::ok(9).bytes()));
    support::produce(&topic, records).await;

    let recorder = Recorder::default();
    let c = Running::start(builder(&recorder, &topic, &group));
    let total = bad.len() as i64 + 1;
    wait_until("everything settled", Duration::from_secs(60), || async {
        recorder.ids() == vec![9] && committed(&group, &topic).await == total
    })
    .await;
    c.stop().await;

    assert_eq!(
        recorder.calls(),
        vec![9],
        "the handler saw only the valid event"
    );
    let letters = support::read_all(&dlt_topic).await;
    assert_eq!(letters.len(), bad.len());
    for (letter, value) in letters.iter().zip(&bad) {
        assert_eq!(letter.value.as_ref(), Some(value), "raw bytes kept");
        assert_eq!(letter.header_str(dlt::FAILURE_KIND), "decode");
        assert_eq!(letter.header_str(dlt::ATTEMPTS), "0");
    }
}
