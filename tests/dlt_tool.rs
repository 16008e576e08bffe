//! `kourier::dead_letter::DeadLetterTopic` and the `kourier-dlt` tool built on it
//! (`src/bin/kourier-dlt/`, feature `cli`) against the real broker: `inspect` lists dead
//! letters with their provenance, filters them and groups the copies of one event; `redrive`
//! re-publishes the letters selected by place, header, key, kind or time to their source
//! topic, where a consumer handles them — stateless by default (reruns see the same
//! letters), resumable with a group tied to its selection (a crash redrives nothing twice but
//! the letter in flight; another selection never inherits its position) — refuses letters
//! it cannot redrive one by one (destination missing, redriven too often) while the others go
//! on, and fails clearly (and in bounded time) for a missing topic or an unreachable broker.
//!
//! The tool's logic is compiled in here (`#[path]`), so this runs the code the installed
//! `kourier-dlt` runs, with or without the `cli` feature; with it, the binary itself is run
//! too (`binary_*` tests); a crash is simulated with its `crash_after` hook
//! (stop right after a re-publish is acknowledged, before its progress is committed: the
//! worst moment).
//!
//! Needs Kafka (`scripts/services up`); each test has its own topics and groups.

mod support;

/// The crate's strategy for arbitrary headers (its unit tests use the same file); the names
/// it uses are imported below.
#[path = "../src/dead_letter/arbitrary_headers.rs"]
mod arbitrary;
#[allow(dead_code)] // the tests use part of the tool
#[path = "../src/bin/kourier-dlt/dlt.rs"]
mod dlt;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kourier::DeadLetterReason;
use kourier::dead_letter::headers::{self, ALL, REDRIVE_COUNT};
use kourier::dead_letter::{
    DeadLetterTopicError, LetterRange, LetterSelector, Redrive, RedriveReport, RedriveStopped,
};
use kourier::tiers::headers as tier;
use kourier::{
    DeadLetter, DeadLetterSink, Handler, HandlerError, Header, Headers, KafkaDeadLetterSink,
    Message, RawRecord, RetryPolicy, RetryingConsumer, async_trait,
};
use serde::{Deserialize, Serialize};

use crate::dlt::{Kafka, Progress};
use crate::support::consumer::{Running, wait_for};

/// How long the consumer may take to handle what a test waits for.
const WAIT: Duration = Duration::from_secs(60);

fn kafka() -> Kafka {
    Kafka {
        bootstrap: support::bootstrap(),
        timeout: Duration::from_secs(10),
    }
}

fn at(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// A dead letter to write: the record of `topic/0@offset` with `key` and `value`, given up
/// for `reason` at `failed_ms` (ms since the epoch), carrying `extra` headers of its own.
struct Letter {
    offset: i64,
    key: String,
    value: Vec<u8>,
    reason: DeadLetterReason,
    failed_ms: u64,
    extra: Headers,
}

/// A permanent failure of the record `{}` at offset `offset`, keyed `key`, given up at
/// 1_800_000_000_000 ms, with no headers of its own.
fn letter(offset: i64, key: &str) -> Letter {
    Letter {
        offset,
        key: key.to_owned(),
        value: b"{}".to_vec(),
        reason: DeadLetterReason::Permanent,
        failed_ms: 1_800_000_000_000,
        extra: Headers::new(),
    }
}

impl Letter {
    fn value(mut self, value: impl Into<Vec<u8>>) -> Self {
        self.value = value.into();
        self
    }

    fn reason(mut self, reason: DeadLetterReason) -> Self {
        self.reason = reason;
        self
    }

    fn failed_ms(mut self, ms: u64) -> Self {
        self.failed_ms = ms;
        self
    }

    fn headers(mut self, extra: Headers) -> Self {
        self.extra = extra;
        self
    }
}

/// Writes `letters` for records of `topic` with kourier's own sink (so the headers are exactly
/// what a consumer writes), and waits until every one is acknowledged.
async fn write_letters(topic: &str, letters: impl IntoIterator<Item = Letter>) {
    let sink = KafkaDeadLetterSink::builder(support::bootstrap())
        .build()
        .expect("sink");
    for l in letters {
        let mut letter = DeadLetter::new(
            RawRecord::builder(topic)
                .offset(l.offset)
                .key(l.key.as_str())
                .value(l.value)
                .headers(l.extra)
                .timestamp(1_700_000_000_000)
                .build(),
            l.reason,
            format!("{} failure of {}", l.reason, l.key),
        );
        letter.attempts = if l.reason == DeadLetterReason::Decode {
            0
        } else {
            3
        };
        letter.first_failure = at(l.failed_ms - 1_000);
        letter.last_failure = at(l.failed_ms);
        letter.group_id = "svc".into();
        sink.send(&letter).await.expect("write dead letter");
    }
    sink.flush(Duration::from_secs(10)).await.expect("flush");
}

async fn topics(name: &str) -> (String, String) {
    let (topic, _, dlt_topic) = support::consumer::setup(name, 1).await;
    (topic, dlt_topic)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("tool panicked")
}

/// Runs the installed `kourier-dlt` binary against the test broker with `args`.
#[cfg(feature = "cli")]
async fn run_tool(args: Vec<String>) -> std::process::Output {
    blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_kourier-dlt"))
            .arg("--bootstrap-servers")
            .arg(support::bootstrap())
            .args(args)
            .output()
            .expect("run kourier-dlt")
    })
    .await
}

/// Every letter of `dlt_topic` (no filter), read through `kafka`, and how many records were
/// read.
async fn inspect_all(kafka: Kafka, dlt_topic: &str) -> anyhow::Result<(Vec<dlt::Letter>, u64)> {
    let dlt_topic = dlt_topic.to_owned();
    blocking(move || {
        dlt::inspect(
            &kafka,
            &dlt_topic,
            &LetterSelector::new(),
            &mut Progress::silent(),
        )
    })
    .await
}

/// Runs `redrive` on `dlt_topic` through the tool's code.
async fn redrive(dlt_topic: &str, redrive: Redrive) -> Result<RedriveReport, RedriveStopped> {
    let dlt_topic = dlt_topic.to_owned();
    blocking(move || dlt::redrive(&kafka(), &dlt_topic, &redrive, &mut Progress::silent())).await
}

/// The letters' places in a report, `partition@offset`.
fn places(report: &RedriveReport) -> Vec<String> {
    report
        .redriven
        .iter()
        .map(|r| format!("{}@{}", r.letter.partition, r.letter.offset))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_lists_provenance_and_filters() {
    let (topic, dlt_topic) = topics("dlt-inspect").await;
    let t0 = 1_800_000_000_000u64;
    let letters = [
        (10, "alice", DeadLetterReason::Permanent, t0),
        (11, "bob", DeadLetterReason::Decode, t0 + 60_000),
        (
            12,
            "alice",
            DeadLetterReason::RetriesExhausted,
            t0 + 120_000,
        ),
        (13, "carol", DeadLetterReason::Permanent, t0 + 180_000),
    ];
    write_letters(
        &topic,
        letters
            .map(|(offset, key, reason, when)| letter(offset, key).reason(reason).failed_ms(when)),
    )
    .await;

    let inspect = |filter: LetterSelector| {
        let dlt_topic = dlt_topic.clone();
        blocking(move || dlt::inspect(&kafka(), &dlt_topic, &filter, &mut Progress::silent()))
    };
    let (all, read) = inspect(LetterSelector::new()).await.expect("inspect");
    assert_eq!(read, 4);
    let offsets: Vec<_> = all.iter().map(|l| l.provenance.original_offset).collect();
    assert_eq!(offsets, [Some(10), Some(11), Some(12), Some(13)]);
    let first = &all[0].provenance;
    assert_eq!(first.original_topic.as_deref(), Some(topic.as_str()));
    assert_eq!(first.original_partition, Some(0));
    assert_eq!(first.failure_kind, Some(DeadLetterReason::Permanent));
    assert_eq!(first.attempts, Some(3));
    assert_eq!(first.error.as_deref(), Some("permanent failure of alice"));
    assert_eq!(first.first_failure, Some(at(t0 - 1_000)));
    assert_eq!(first.last_failure, Some(at(t0)));
    assert_eq!(first.consumer_group.as_deref(), Some("svc"));

    let original_offsets = |letters: &[dlt::Letter]| -> Vec<i64> {
        letters
            .iter()
            .filter_map(|l| l.provenance.original_offset)
            .collect()
    };
    let by_kind = inspect(LetterSelector::new().kind(DeadLetterReason::Permanent))
        .await
        .unwrap()
        .0;
    assert_eq!(original_offsets(&by_kind), [10, 13]);
    let by_key = inspect(LetterSelector::new().key("alice")).await.unwrap().0;
    assert_eq!(original_offsets(&by_key), [10, 12]);
    let by_time = inspect(
        LetterSelector::new()
            .since(at(t0 + 60_000))
            .until(at(t0 + 180_000)),
    )
    .await
    .unwrap()
    .0;
    assert_eq!(
        original_offsets(&by_time),
        [11, 12],
        "since inclusive, until exclusive"
    );
    let combined = inspect(
        LetterSelector::new()
            .kind(DeadLetterReason::RetriesExhausted)
            .kind(DeadLetterReason::Decode)
            .key("alice"),
    )
    .await
    .unwrap()
    .0;
    assert_eq!(original_offsets(&combined), [12]);

    // Both output formats.
    let table = dlt::table(&all);
    assert_eq!(table.lines().count(), 5);
    assert!(table.starts_with("DLT "));
    assert!(table.contains(&format!("{topic}/0@12")));
    assert!(table.contains("retries-exhausted"));
    let json = all[1].to_json();
    assert_eq!(json["kind"], "decode");
    assert_eq!(json["original_offset"], 11);
    assert_eq!(json["key"], "bob");
    assert_eq!(json["attempts"], 0);
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Ev {
    id: u32,
}

/// Event ids handled, each with the redrive count its record carried.
type HandledLog = Arc<Mutex<Vec<(u32, Option<String>)>>>;

/// Handles records, failing permanently while `failing` is set; logs what it handled with the
/// redrive count it carried.
struct Service {
    failing: Arc<Mutex<bool>>,
    handled: HandledLog,
}

#[async_trait]
impl Handler for Service {
    type Event = Ev;
    async fn handle(&self, m: &Message<Ev>) -> Result<(), HandlerError> {
        if *self.failing.lock().unwrap() {
            return Err(HandlerError::permanent("downstream refuses it"));
        }
        let count = m
            .headers()
            .get_str(headers::REDRIVE_COUNT)
            .map(str::to_owned);
        self.handled.lock().unwrap().push((m.event().id, count));
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redriven_letters_are_handled_in_their_source_topic_once() {
    let (topic, dlt_topic) = topics("dlt-redrive").await;
    let failing = Arc::new(Mutex::new(true));
    let handled = Arc::new(Mutex::new(Vec::new()));
    let consumer = Running::start(
        RetryingConsumer::builder(Service {
            failing: failing.clone(),
            handled: handled.clone(),
        })
        .bootstrap_servers(support::bootstrap())
        .group_id(support::unique_name("dlt-redrive-svc"))
        .topic(&topic)
        .retry_policy(RetryPolicy::no_retries())
        .commit_interval(Duration::from_millis(200)),
    );

    // Four records fail and are dead-lettered by the consumer itself.
    let records = (1..=4)
        .map(|id| {
            support::TestRecord::new()
                .key(format!("u{id}"))
                .value(serde_json::to_vec(&Ev { id }).unwrap())
                .header("event-id", Some(format!("e-{id}").into_bytes()))
        })
        .collect();
    support::produce(&topic, records).await;
    wait_for("4 dead letters", WAIT, || {
        consumer.monitor.snapshot().dead_lettered.permanent == 4
    })
    .await;
    *failing.lock().unwrap() = false;

    // A dry run publishes nothing.
    let report = redrive(
        &dlt_topic,
        Redrive::new(LetterSelector::new()).dry_run(true),
    )
    .await
    .expect("dry run");
    assert_eq!(report.redriven.len(), 4);
    assert!(report.redriven.iter().all(|r| r.offset.is_none()));

    // Redrive u2 only.
    let first = redrive(&dlt_topic, Redrive::new(LetterSelector::new().key("u2")))
        .await
        .expect("redrive u2");
    assert_eq!(first.redriven.len(), 1);
    assert_eq!(first.filtered_out, 3);
    assert_eq!(first.redriven[0].topic, topic);
    wait_for("u2 handled", WAIT, || handled.lock().unwrap().len() == 1).await;

    // Stateless: nothing was committed, so a run with another filter still sees u4.
    let u4 = redrive(&dlt_topic, Redrive::new(LetterSelector::new().key("u4")))
        .await
        .expect("redrive u4");
    assert_eq!((u4.read, u4.redriven.len()), (4, 1));
    wait_for("u4 handled", WAIT, || handled.lock().unwrap().len() == 2).await;

    consumer.stop().await;
    let mut got = handled.lock().unwrap().clone();
    got.sort();
    assert_eq!(
        got,
        [(2, Some("1".to_owned())), (4, Some("1".to_owned()))],
        "each selected letter handled once, with redrive count 1"
    );

    // The redriven records: original key, value and headers, no dead-letter headers.
    let source = support::read_all(&topic).await;
    assert_eq!(source.len(), 6);
    for r in &source[4..] {
        assert!(
            headers::ALL.iter().all(|h| r.header(h).is_none()),
            "no dead-letter header left: {:?}",
            r.headers
        );
        let id: Ev = serde_json::from_slice(r.value.as_deref().unwrap()).unwrap();
        assert_eq!(r.key.as_deref(), Some(format!("u{}", id.id).as_bytes()));
        assert_eq!(
            r.header("event-id").flatten(),
            Some(format!("e-{}", id.id).as_bytes())
        );
        assert_eq!(r.header(headers::REDRIVE_COUNT).flatten(), Some(&b"1"[..]));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_redrive_resumes_without_redriving_twice() {
    let (topic, dlt_topic) = topics("dlt-crash").await;
    write_letters(
        &topic,
        (0..6).map(|offset| {
            let value = serde_json::to_vec(&Ev { id: offset as u32 }).unwrap();
            letter(offset, &format!("k{offset}")).value(value)
        }),
    )
    .await;
    let group = support::unique_name("dlt-crash-tool");
    let resumable = || Redrive::new(LetterSelector::new()).resume_group(group.clone());

    let mut crashing = resumable();
    crashing.crash_after = Some(3);
    let crashed = redrive(&dlt_topic, crashing)
        .await
        .expect_err("the simulated crash");
    assert!(
        matches!(*crashed.error, DeadLetterTopicError::SimulatedCrash),
        "{crashed:?}"
    );
    assert_eq!(places(&crashed.report), ["0@0", "0@1", "0@2"]);
    let committed = support::committed_offsets(&group, &dlt_topic, 1).await;
    assert_eq!(
        committed[&0],
        Some(2),
        "letters 0 and 1 committed; letter 2 was acknowledged but not committed"
    );
    assert_eq!(support::read_all(&topic).await.len(), 3);

    let rerun = redrive(&dlt_topic, resumable()).await.expect("rerun");
    assert_eq!(
        places(&rerun),
        ["0@2", "0@3", "0@4", "0@5"],
        "resumes at the letter in flight"
    );

    // At-least-once bound: every letter redriven once, the one in flight at the crash twice.
    let source = support::read_all(&topic).await;
    let mut ids: Vec<u32> = source
        .iter()
        .map(|r| {
            serde_json::from_slice::<Ev>(r.value.as_deref().unwrap())
                .unwrap()
                .id
        })
        .collect();
    ids.sort();
    assert_eq!(ids, [0, 1, 2, 2, 3, 4, 5]);
    assert_eq!(
        support::committed_offsets(&group, &dlt_topic, 1).await[&0],
        Some(6)
    );
    let nothing = redrive(&dlt_topic, resumable()).await.expect("third run");
    assert!(nothing.redriven.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn letters_redriven_too_often_are_refused_unless_forced() {
    let (topic, dlt_topic) = topics("dlt-loop").await;
    let redriven_thrice = Headers::new().with(headers::REDRIVE_COUNT, "3");
    write_letters(
        &topic,
        [
            letter(0, "looping")
                .value(b"{\"id\":1}")
                .headers(redriven_thrice),
            letter(1, "fresh").value(b"{\"id\":2}"),
        ],
    )
    .await;

    let refused = redrive(&dlt_topic, Redrive::new(LetterSelector::new()))
        .await
        .expect("redrive");
    assert_eq!(refused.redriven.len(), 1);
    assert_eq!(refused.redriven[0].key.as_deref(), Some(&b"fresh"[..]));
    assert_eq!(refused.refused.len(), 1);
    assert!(
        refused.refused[0]
            .reason
            .contains("already redriven 3 time(s)")
    );

    let forced = redrive(
        &dlt_topic,
        Redrive::new(LetterSelector::new().key("looping")).force(true),
    )
    .await
    .expect("forced redrive");
    assert_eq!(forced.redriven.len(), 1);
    assert_eq!(forced.redriven[0].redrive_count, 4);
    let source = support::read_all(&topic).await;
    assert_eq!(
        source
            .last()
            .unwrap()
            .header(headers::REDRIVE_COUNT)
            .flatten(),
        Some(&b"4"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_topics_and_unreachable_brokers_are_clear_errors() {
    support::require_kafka().await;
    let missing = support::unique_name("dlt-missing");
    let err = inspect_all(kafka(), &missing)
        .await
        .expect_err("missing topic");
    assert_eq!(err.to_string(), format!("topic {missing} does not exist"));

    let err = redrive(&missing, Redrive::new(LetterSelector::new()))
        .await
        .expect_err("missing dead-letter topic");
    assert_eq!(
        err.error.to_string(),
        format!("topic {missing} does not exist")
    );

    let started = Instant::now();
    let down = Kafka {
        bootstrap: "127.0.0.1:1".into(),
        timeout: Duration::from_secs(2),
    };
    let err = inspect_all(down, "any.dlt").await.expect_err("no broker");
    assert!(
        err.to_string().contains("did not answer within 2s"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(10), "bounded wait");
}

#[test]
fn command_line_times_and_kinds_parse() {
    assert_eq!(
        dlt::parse_time("2027-01-15T08:00:00Z").unwrap(),
        humantime::parse_rfc3339("2027-01-15T08:00:00Z").unwrap()
    );
    assert_eq!(
        dlt::parse_time("2027-01-15").unwrap(),
        humantime::parse_rfc3339("2027-01-15T00:00:00Z").unwrap()
    );
    assert_eq!(
        dlt::parse_time("1800000000000").unwrap(),
        at(1_800_000_000_000)
    );
    let two_hours_ago = dlt::parse_time("2h").unwrap();
    let expected = SystemTime::now() - Duration::from_secs(7200);
    assert!(two_hours_ago <= expected && two_hours_ago > expected - Duration::from_secs(5));
    assert!(dlt::parse_time("yesterday-ish").is_err());
    assert_eq!(
        dlt::parse_kind("retries-exhausted"),
        Ok(DeadLetterReason::RetriesExhausted)
    );
    assert!(dlt::parse_kind("other").is_err());
}

/// Header names that are not UTF-8, empty or hold a NUL byte: `inspect --json` shows them
/// escaped with their exact bytes beside, never replaced; `redrive` publishes them byte for
/// byte, in order, duplicates and null values kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_header_names_are_shown_escaped_and_redriven_byte_for_byte() {
    let (topic, dlt_topic) = topics("dlt-hdr-bytes").await;
    let odd = Headers::from_iter([
        Header::new(b"\xc3\x28\x78".to_vec(), "first"),
        Header::new(b"\xff\xfe".to_vec(), vec![0xff, 0x00]),
        Header::new(Vec::new(), "empty name"),
        Header::null(b"a\0b".to_vec()),
        Header::new(b"\xc3\x28\x78".to_vec(), "second"),
        Header::new("back\\slash", "text"),
    ]);
    write_letters(&topic, [letter(3, "erin").headers(odd.clone())]).await;

    let inspected = inspect_all(kafka(), &dlt_topic).await.expect("inspect").0;
    assert_eq!(inspected.len(), 1);
    let json = inspected[0].to_json();
    assert_eq!(
        json["headers"],
        serde_json::json!([
            {"name": "\\xc3(x", "name_hex": "c32878", "value": "first"},
            {"name": "\\xff\\xfe", "name_hex": "fffe", "value_hex": "ff00"},
            {"name": "", "value": "empty name"},
            {"name": "a\u{0}b", "value": null},
            {"name": "\\xc3(x", "name_hex": "c32878", "value": "second"},
            {"name": "back\\slash", "value": "text"},
        ]),
        "{json}"
    );

    let destination = support::new_topic("dlt-hdr-bytes-to", 1).await;
    let report = redrive(
        &dlt_topic,
        Redrive::new(LetterSelector::new()).to(&destination),
    )
    .await
    .expect("redrive");
    assert_eq!(report.redriven.len(), 1, "{report:?}");
    let redriven = support::read_all(&destination).await;
    assert_eq!(redriven.len(), 1);
    let mut expected = odd;
    expected.push(Header::new(headers::REDRIVE_COUNT, "1"));
    expected.push(Header::new(
        headers::REDRIVEN_FROM,
        format!("{dlt_topic}/0@0"),
    ));
    assert_eq!(redriven[0].raw_headers, expected);
}

/// The installed binary (feature `cli`): `inspect --json` lists a letter with its provenance,
/// and a missing topic is a failure exit with a clear message.
#[cfg(feature = "cli")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_inspects_and_fails_clearly() {
    let (topic, dlt_topic) = topics("dlt-binary").await;
    write_letters(&topic, [letter(7, "dora")]).await;

    let out = run_tool(vec!["inspect".into(), dlt_topic.clone(), "--json".into()]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let lines: Vec<_> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    assert!(
        lines[0].contains(&topic) && lines[0].contains("permanent"),
        "{stdout}"
    );

    let missing = support::unique_name("dlt-binary-missing");
    let out = run_tool(vec!["inspect".into(), missing.clone()]).await;
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&missing), "{stderr}");
}

/// A redrive count too large for a `u32` (`99999999999`) or unreadable is refused by
/// `--max-redrives` (delivery rule 17): it must not read as 0 and loop the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_or_unreadable_redrive_counts_are_refused() {
    let (topic, dlt_topic) = topics("dlt-hostile-count").await;
    let letters = [
        (0, "huge", Some("99999999999")),
        (1, "junk", Some("many")),
        (2, "fresh", None),
    ]
    .map(|(offset, key, count)| {
        let extra = match count {
            Some(c) => Headers::new().with(headers::REDRIVE_COUNT, c),
            None => Headers::new(),
        };
        letter(offset, key).value(b"{\"id\":1}").headers(extra)
    });
    write_letters(&topic, letters).await;

    let report = redrive(&dlt_topic, Redrive::new(LetterSelector::new()))
        .await
        .expect("redrive");
    let redriven: Vec<_> = report
        .redriven
        .iter()
        .map(|r| r.key.clone().unwrap_or_default())
        .collect();
    assert_eq!(redriven, [b"fresh".to_vec()], "{report:?}");
    assert_eq!(report.refused.len(), 2, "{report:?}");
    for refused in &report.refused {
        assert!(
            refused
                .reason
                .contains(&format!("already redriven {} time(s)", u32::MAX)),
            "{refused:?}"
        );
    }
}

/// A letter whose failure times lie past year 9999 is listed (table and JSON, in-process and
/// through the binary) with those times left out, instead of panicking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_lists_a_letter_with_a_failure_time_past_year_9999() {
    let (topic, dlt_topic) = topics("dlt-year-10000").await;
    // 10000-01-01T00:00:01Z: both failure times are past 9999-12-31.
    let year_10000 = 253_402_300_801_000;
    write_letters(&topic, [letter(5, "far").failed_ms(year_10000)]).await;

    let (letters, read) = inspect_all(kafka(), &dlt_topic).await.expect("inspect");
    assert_eq!((letters.len(), read), (1, 1));
    let table = dlt::table(&letters);
    assert_eq!(table.lines().count(), 2, "{table}");
    assert!(table.contains(&format!("{topic}/0@5")), "{table}");
    let json = letters[0].to_json();
    assert_eq!(json["last_failure"], serde_json::Value::Null, "{json}");
    assert_eq!(json["original_offset"], 5);
    assert_eq!(letters[0].provenance.last_failure, None, "past year 9999");

    #[cfg(feature = "cli")]
    for json in [false, true] {
        let mut args = vec!["inspect".to_owned(), dlt_topic.clone()];
        if json {
            args.push("--json".into());
        }
        let out = run_tool(args).await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "json={json}: {out:?}");
        assert!(stdout.contains(&topic), "json={json}: {stdout}");
    }
}

proptest::proptest! {
    /// The tool's reading and formatting never panic, whatever a letter's headers, key and
    /// timestamp hold; a letter is always one table row; JSON always serialises.
    #[test]
    fn any_letter_is_listed_without_panicking(
        headers in arbitrary::arbitrary_headers(),
        timestamp in proptest::option::of(proptest::prelude::any::<i64>()),
        key in proptest::option::of(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..8)),
    ) {
        let mut record = RawRecord::builder("t.dlt").offset(1).headers(headers).build();
        record.key = key.map(Into::into);
        record.timestamp = timestamp;
        let letter = dlt::Letter::new(record);
        let table = dlt::table(std::slice::from_ref(&letter));
        proptest::prop_assert_eq!(table.lines().count(), 2, "{}", table);
        proptest::prop_assert!(serde_json::to_string(&letter.to_json()).is_ok());
        let _ = (letter.tier(), letter.place());
        let filter = LetterSelector::new()
            .kind(DeadLetterReason::Permanent)
            .header("event-id", "e-1")
            .since(at(0))
            .until(at(u64::MAX / 2));
        let _ = filter.matches(&letter.record);
        let groups = dlt::group(std::slice::from_ref(&letter), &dlt::GroupBy::Header("event-id".into()));
        let table = dlt::grouped_table(&groups, &dlt::GroupBy::Key);
        proptest::prop_assert_eq!(table.lines().count(), 2, "{}", table);
    }
}

// ───────────── selective redrive (issue 29) ─────────────

/// Six letters of `topic` at DLT offsets 0..6, keyed `k<n>`, each with `event-id: e-<n>`
/// and the value `{"id": n}`.
async fn six_letters(topic: &str) {
    write_letters(
        topic,
        (0..6).map(|n| {
            letter(n, &format!("k{n}"))
                .value(serde_json::to_vec(&Ev { id: n as u32 }).unwrap())
                .headers(Headers::new().with("event-id", format!("e-{n}")))
        }),
    )
    .await;
}

/// One letter by its place, one by its event id, a range: each run republishes exactly those
/// letters, and its report gives each letter's place and where it landed — the record found
/// there is that letter's, marked with where it came from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_selects_letters_by_place_event_id_and_range() {
    let (topic, dlt_topic) = topics("dlt-select").await;
    six_letters(&topic).await;
    let destination = support::new_topic("dlt-select-to", 1).await;
    let run =
        |selector: LetterSelector| redrive(&dlt_topic, Redrive::new(selector).to(&destination));

    let by_place = run(LetterSelector::new().at("0:2".parse().unwrap()))
        .await
        .expect("by place");
    assert_eq!(places(&by_place), ["0@2"]);
    assert_eq!(
        (by_place.total, by_place.read),
        (1, 1),
        "reads only the place asked for"
    );
    let by_event = run(LetterSelector::new().header("event-id", "e-4"))
        .await
        .expect("by event id");
    assert_eq!(places(&by_event), ["0@4"]);
    assert_eq!(by_event.filtered_out, 5);
    let range = run(LetterSelector::new().at(LetterRange::new(0, 1, 3)))
        .await
        .expect("range");
    assert_eq!(places(&range), ["0@1", "0@2", "0@3"]);

    let landed = support::read_all(&destination).await;
    assert_eq!(landed.len(), 5);
    for r in by_place
        .redriven
        .iter()
        .chain(&by_event.redriven)
        .chain(&range.redriven)
    {
        assert_eq!(r.topic, destination);
        let at = support::record_at(
            &landed,
            r.partition.expect("partition"),
            r.offset.expect("offset"),
        );
        assert_eq!(
            at.header_str("event-id"),
            format!("e-{}", r.letter.offset),
            "the report's coordinates name the letter's record"
        );
        assert_eq!(
            at.header_str(headers::REDRIVEN_FROM),
            format!("{dlt_topic}/0@{}", r.letter.offset)
        );
        assert_eq!(r.original, format!("{topic}/0@{}", r.letter.offset));
    }
}

/// A letter whose destination topic does not exist is refused with the reason and the
/// others go on, in a dry run too; nothing stops at the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_destination_refuses_its_letter_and_the_others_go_on() {
    let (topic, dlt_topic) = topics("dlt-refuse").await;
    let gone = support::unique_name("dlt-refuse-gone");
    write_letters(&topic, [letter(0, "a").value(b"{\"id\":0}")]).await;
    // The letter at DLT offset 1 names a source topic that does not exist (any more).
    support::produce(
        &dlt_topic,
        vec![
            support::TestRecord::new()
                .key("b")
                .value(b"{\"id\":1}")
                .header(headers::ORIGINAL_TOPIC, Some(gone.clone().into_bytes()))
                .header(headers::FAILURE_KIND, Some(b"permanent".to_vec())),
        ],
    )
    .await;
    write_letters(&topic, [letter(2, "c").value(b"{\"id\":2}")]).await;

    for dry_run in [true, false] {
        let report = redrive(
            &dlt_topic,
            Redrive::new(LetterSelector::new()).dry_run(dry_run),
        )
        .await
        .unwrap_or_else(|e| panic!("dry run {dry_run}: {e:?}"));
        assert_eq!(places(&report), ["0@0", "0@2"], "dry run {dry_run}");
        assert_eq!(report.refused.len(), 1, "dry run {dry_run}: {report:?}");
        let refused = &report.refused[0];
        assert_eq!(refused.letter.to_string(), format!("{dlt_topic}/0@1"));
        assert_eq!(refused.reason, format!("topic {gone} does not exist"));
    }
    let source = support::read_all(&topic).await;
    assert_eq!(source.len(), 2, "only the real run published, both others");

    #[cfg(feature = "cli")]
    {
        let out = run_tool(vec![
            "redrive".into(),
            dlt_topic.clone(),
            "--dry-run".into(),
        ])
        .await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(2),
            "refused letters: exit 2\n{stdout}{out:?}"
        );
        assert!(
            stdout.contains(&format!("refused {dlt_topic}/0@1 (")),
            "{stdout}"
        );
        let would = stdout
            .lines()
            .filter(|l| l.starts_with("would redrive "))
            .count();
        assert_eq!(would, 2, "{stdout}");
        let out = run_tool(vec![
            "redrive".into(),
            dlt_topic.clone(),
            "--dry-run".into(),
            "--at".into(),
            "0:2".into(),
        ])
        .await;
        assert_eq!(
            out.status.code(),
            Some(0),
            "nothing refused: exit 0 {out:?}"
        );
    }
}

/// A letter the broker refuses for itself (here: too large for its destination) is refused
/// with the broker's reason, and the letters after it are still redriven.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_letter_the_destination_refuses_is_refused_and_the_others_go_on() {
    let (topic, dlt_topic) = topics("dlt-too-large").await;
    let big = format!("{{\"id\":1,\"pad\":\"{}\"}}", "x".repeat(20_000));
    write_letters(
        &topic,
        [
            letter(0, "small-0").value(b"{\"id\":0}"),
            letter(1, "big").value(big),
            letter(2, "small-2").value(b"{\"id\":2}"),
        ],
    )
    .await;
    let destination = support::unique_name("dlt-too-large-to");
    support::create_topic_with_config(&destination, 1, &[("max.message.bytes", "4096")]).await;
    let report = redrive(
        &dlt_topic,
        Redrive::new(LetterSelector::new()).to(&destination),
    )
    .await
    .expect("the run goes on");
    assert_eq!(places(&report), ["0@0", "0@2"], "{report:?}");
    assert_eq!(report.refused.len(), 1, "{report:?}");
    assert_eq!(report.refused[0].letter.offset, 1);
    assert!(
        report.refused[0].reason.contains("too large"),
        "{:?}",
        report.refused[0]
    );
    let landed = support::read_all(&destination).await;
    let keys: Vec<_> = landed.iter().map(|r| r.key.clone().unwrap()).collect();
    assert_eq!(keys, [b"small-0".to_vec(), b"small-2".to_vec()]);
}

/// Stateless runs commit nothing: a rerun sees the same letters and redrives them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stateless_reruns_see_the_same_letters() {
    let (topic, dlt_topic) = topics("dlt-stateless").await;
    six_letters(&topic).await;
    let selector = LetterSelector::new().at(LetterRange::new(0, 1, 2));
    let first = redrive(&dlt_topic, Redrive::new(selector.clone()))
        .await
        .expect("first");
    let second = redrive(&dlt_topic, Redrive::new(selector))
        .await
        .expect("second");
    assert_eq!(places(&first), ["0@1", "0@2"]);
    assert_eq!(places(&second), places(&first));
    assert_ne!(
        first.redriven[0].offset, second.redriven[0].offset,
        "each run reports its own republished record"
    );
    assert_eq!(support::read_all(&topic).await.len(), 4);
}

/// A resumable run commits its position tied to its selection: a rerun with the same
/// selection goes on from there; a run with another selection refuses that position (and a
/// position without one, e.g. from the old `--group`) instead of passing over letters the
/// first selection filtered out, and with a group of its own it finds them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumable_redrive_never_passes_over_letters_another_selection_selects() {
    let (topic, dlt_topic) = topics("dlt-resume").await;
    six_letters(&topic).await;
    let group = support::unique_name("dlt-resume-g");
    let k1 = || Redrive::new(LetterSelector::new().key("k1")).resume_group(group.clone());

    let first = redrive(&dlt_topic, k1()).await.expect("k1");
    assert_eq!(
        (places(&first), first.filtered_out),
        (vec!["0@1".to_owned()], 5)
    );
    assert_eq!(
        support::committed_offsets(&group, &dlt_topic, 1).await[&0],
        Some(6),
        "every letter was considered by this selection"
    );
    let again = redrive(&dlt_topic, k1()).await.expect("k1 again");
    assert_eq!(
        (again.read, again.redriven.len()),
        (0, 0),
        "resumed at the end"
    );

    let other = redrive(
        &dlt_topic,
        Redrive::new(LetterSelector::new().key("k4")).resume_group(group.clone()),
    )
    .await
    .expect_err("another selection on the same group");
    assert!(
        matches!(&*other.error, DeadLetterTopicError::ResumeMismatch { wanted, .. } if wanted == "key=k4"),
        "{other:?}"
    );
    assert!(other.report.redriven.is_empty());

    let own = redrive(
        &dlt_topic,
        Redrive::new(LetterSelector::new().key("k4"))
            .resume_group(support::unique_name("dlt-resume-k4")),
    )
    .await
    .expect("k4 with its own group");
    assert_eq!(places(&own), ["0@4"], "the letter k1's run filtered out");

    // A position committed without a selection (the old tool's `--group`) is refused too.
    let legacy = support::unique_name("dlt-resume-legacy");
    support::commit_offsets(&legacy, &dlt_topic, &[(0, 3)]).await;
    let err = redrive(
        &dlt_topic,
        Redrive::new(LetterSelector::new()).resume_group(legacy),
    )
    .await
    .expect_err("a position of unknown selection");
    assert!(
        err.error.to_string().contains("none recorded"),
        "{}",
        err.error
    );
    assert_eq!(support::read_all(&topic).await.len(), 2);
}

/// Redriving a letter of an event the consumer already delivered from a redrive (a rerun of
/// a stateless redrive, or a second letter of the event) does not run the handler again:
/// the redriven record keeps its `event-id` and carries the same redrive count, so its dedup
/// key (`<event>#r1`) is already done. A stale letter of an event handled from its *source*
/// record does run again: a redrive is a delivery position of its own (documented in the
/// crate's idempotency docs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_letter_is_not_handled_twice_by_an_idempotent_consumer() {
    use kourier::{DedupKey, Idempotency, InMemoryIdempotencyStore};

    let (topic, dlt_topic) = topics("dlt-idem").await;
    let failing = Arc::new(Mutex::new(true));
    let handled: HandledLog = Arc::new(Mutex::new(Vec::new()));
    let consumer = Running::start(
        RetryingConsumer::builder(Service {
            failing: failing.clone(),
            handled: handled.clone(),
        })
        .bootstrap_servers(support::bootstrap())
        .group_id(support::unique_name("dlt-idem-svc"))
        .topic(&topic)
        .retry_policy(RetryPolicy::no_retries())
        .idempotency(Idempotency::new(
            Arc::new(InMemoryIdempotencyStore::new()),
            DedupKey::header("event-id"),
        ))
        .commit_interval(Duration::from_millis(200)),
    );
    // e-1 fails and is dead-lettered by the consumer.
    support::produce(
        &topic,
        vec![
            support::TestRecord::new()
                .key("u1")
                .value(serde_json::to_vec(&Ev { id: 1 }).unwrap())
                .header("event-id", Some(b"e-1".to_vec())),
        ],
    )
    .await;
    wait_for("e-1 dead-lettered", WAIT, || {
        consumer.monitor.snapshot().dead_lettered.permanent == 1
    })
    .await;
    *failing.lock().unwrap() = false;

    let e1 = || Redrive::new(LetterSelector::new().header("event-id", "e-1"));
    let first = redrive(&dlt_topic, e1()).await.expect("redrive e-1");
    assert_eq!(first.redriven.len(), 1);
    wait_for("e-1 handled", WAIT, || handled.lock().unwrap().len() == 1).await;

    // The same letter again (a stateless rerun): delivered, but skipped as a duplicate.
    let second = redrive(&dlt_topic, e1()).await.expect("redrive e-1 again");
    assert_eq!(second.redriven.len(), 1);
    wait_for("the second copy skipped", WAIT, || {
        consumer.monitor.snapshot().duplicates == 1
    })
    .await;

    // A second letter of e-1 (as a crash can write): redriving both letters of the event
    // delivers two more copies at redrive count 1, both skipped.
    write_letters(
        &topic,
        [letter(0, "u1")
            .value(serde_json::to_vec(&Ev { id: 1 }).unwrap())
            .headers(Headers::new().with("event-id", "e-1"))],
    )
    .await;
    let both = redrive(&dlt_topic, e1())
        .await
        .expect("redrive both letters of e-1");
    assert_eq!(places(&both), ["0@0", "0@1"]);
    wait_for("both copies skipped", WAIT, || {
        consumer.monitor.snapshot().duplicates == 3
    })
    .await;

    // A stale letter of e-2, which the consumer handled from its source record.
    support::produce(
        &topic,
        vec![
            support::TestRecord::new()
                .key("u2")
                .value(serde_json::to_vec(&Ev { id: 2 }).unwrap())
                .header("event-id", Some(b"e-2".to_vec())),
        ],
    )
    .await;
    wait_for("e-2 handled", WAIT, || handled.lock().unwrap().len() == 2).await;
    write_letters(
        &topic,
        [letter(1, "u2")
            .value(serde_json::to_vec(&Ev { id: 2 }).unwrap())
            .headers(Headers::new().with("event-id", "e-2"))],
    )
    .await;
    let stale = redrive(
        &dlt_topic,
        Redrive::new(LetterSelector::new().header("event-id", "e-2")),
    )
    .await
    .expect("redrive e-2");
    assert_eq!(stale.redriven.len(), 1);
    wait_for("e-2 handled again", WAIT, || {
        handled.lock().unwrap().len() == 3
    })
    .await;
    consumer.stop().await;

    let got = handled.lock().unwrap().clone();
    assert_eq!(
        got,
        [
            (1, Some("1".to_owned())),
            (2, None),
            (2, Some("1".to_owned()))
        ],
        "e-1 once from its redrives; e-2 from its source and from the stale letter"
    );
    let source = support::read_all(&topic).await;
    let from: Vec<(&str, &str)> = source
        .iter()
        .filter(|r| r.header(headers::REDRIVEN_FROM).is_some())
        .map(|r| {
            (
                r.header_str("event-id"),
                r.header_str(headers::REDRIVEN_FROM),
            )
        })
        .collect();
    let (l0, l1, l2) = (
        format!("{dlt_topic}/0@0"),
        format!("{dlt_topic}/0@1"),
        format!("{dlt_topic}/0@2"),
    );
    assert_eq!(
        from,
        [
            ("e-1", l0.as_str()),
            ("e-1", l0.as_str()),
            ("e-1", l0.as_str()),
            ("e-1", l1.as_str()),
            ("e-2", l2.as_str()),
        ],
        "every copy keeps its event id and names its letter"
    );
}

/// `inspect --group-by` shows the copies of one event together with their fates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_groups_the_letters_of_one_event() {
    let (topic, dlt_topic) = topics("dlt-group").await;
    let event = |id: &str| Headers::new().with("event-id", id);
    write_letters(
        &topic,
        [
            letter(0, "u1").headers(event("e-1")),
            letter(1, "u2").headers(event("e-2")),
            letter(0, "u1")
                .headers(event("e-1"))
                .reason(DeadLetterReason::RetriesExhausted),
            letter(2, "u3"),
        ],
    )
    .await;
    let (letters, _) = inspect_all(kafka(), &dlt_topic).await.expect("inspect");
    let by = dlt::GroupBy::parse("event-id").unwrap();
    let groups = dlt::group(&letters, &by);
    let shape: Vec<(Option<&str>, Vec<String>)> = groups
        .iter()
        .map(|g| {
            (
                g.value.as_deref(),
                g.letters.iter().map(|l| l.place()).collect(),
            )
        })
        .collect();
    assert_eq!(
        shape,
        [
            (Some("e-1"), vec!["0@0".to_owned(), "0@2".to_owned()]),
            (Some("e-2"), vec!["0@1".to_owned()]),
            (None, vec!["0@3".to_owned()]),
        ]
    );
    let table = dlt::grouped_table(&groups, &by);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().take(2).collect::<Vec<_>>(),
        ["EVENT-ID", "DLT"],
        "{table}"
    );
    assert!(
        lines[1].starts_with("e-1 (2 letters)") && lines[1].contains("permanent"),
        "{table}"
    );
    assert!(
        lines[2].starts_with("   ") && lines[2].contains("retries-exhausted"),
        "{table}"
    );
    assert_eq!(lines[3].trim(), "", "a blank line between groups: {table}");
    assert!(table.contains("(no event-id)"), "{table}");
    let json = dlt::group_json(&by, &groups[0]);
    assert_eq!(json["value"], "e-1");
    assert_eq!(
        json["kinds"],
        serde_json::json!(["permanent", "retries-exhausted"])
    );
    assert_eq!(json["fates"][1]["dlt_offset"], 2);
    assert_eq!(dlt::GroupBy::parse("key"), Ok(dlt::GroupBy::Key));
    assert_eq!(
        dlt::GroupBy::parse("header:key"),
        Ok(dlt::GroupBy::Header("key".into()))
    );
    let by_key = dlt::group(&letters, &dlt::GroupBy::Key);
    assert_eq!(by_key.len(), 3, "u1 twice, u2, u3");

    #[cfg(feature = "cli")]
    {
        let out = run_tool(vec![
            "inspect".into(),
            dlt_topic.clone(),
            "--group-by".into(),
        ])
        .await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{out:?}");
        assert!(
            stdout.contains("e-1 (2 letters)"),
            "--group-by alone is event-id: {stdout}"
        );
    }
}

/// The binary: one letter by its offset and the letters of one event id, each printed with
/// the letter's place and where it landed.
#[cfg(feature = "cli")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_redrives_one_letter_by_offset_and_by_event_id() {
    let (topic, dlt_topic) = topics("dlt-binary-select").await;
    six_letters(&topic).await;
    let out = run_tool(vec![
        "redrive".into(),
        dlt_topic.clone(),
        "--at".into(),
        "0:3".into(),
    ])
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.starts_with(&format!(
            "redrove {dlt_topic}/0@3 ({topic}/0@3) -> {topic}/0@0  key=k3 redrive-count=1
"
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains("read 1, redrove 1, filtered out 0, refused 0 (stateless"),
        "{stdout}"
    );
    let out = run_tool(vec![
        "redrive".into(),
        dlt_topic.clone(),
        "--header".into(),
        "event-id=e-5".into(),
    ])
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.starts_with(&format!(
            "redrove {dlt_topic}/0@5 ({topic}/0@5) -> {topic}/0@1 "
        )),
        "{stdout}"
    );
    let source = support::read_all(&topic).await;
    let events: Vec<&str> = source.iter().map(|r| r.header_str("event-id")).collect();
    assert_eq!(events, ["e-3", "e-5"]);

    // `--json`: one object per letter, with its place and where it landed.
    let out = run_tool(vec![
        "redrive".into(),
        dlt_topic.clone(),
        "--at".into(),
        "0:1".into(),
        "--json".into(),
    ])
    .await;
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    assert_eq!(
        line,
        serde_json::json!({
            "status": "redriven",
            "letter": {"topic": dlt_topic, "partition": 0, "offset": 1},
            "original": format!("{topic}/0@1"),
            "key": "k1",
            "key_hex": null,
            "destination": {"topic": topic, "partition": 0, "offset": 2},
            "redrive_count": 1,
        })
    );

    // The removed `--group` is refused with its migration, before anything is read.
    let out = run_tool(vec![
        "redrive".into(),
        dlt_topic.clone(),
        "--group".into(),
        "g".into(),
    ])
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr.contains("use --resume-group with a new group name"),
        "{stderr}"
    );
}

/// `DeadLetterTopic::read_at_most` (the console's page bound) stops at the letter limit or
/// the read limit and says more may follow; read to the end, it says nothing more follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounded_read_stops_at_its_limits() {
    let (topic, dlt_topic) = topics("dlt-bounded").await;
    let keys = ["a", "b", "a", "b", "a"];
    write_letters(
        &topic,
        keys.iter().enumerate().map(|(i, k)| letter(i as i64, k)),
    )
    .await;
    let dlt = kafka().topic(&dlt_topic);
    let (two, first_three_read, all_a) = tokio::task::spawn_blocking(move || {
        (
            dlt.read_at_most(&LetterSelector::new(), 2, u64::MAX, |_, _| {})
                .expect("read"),
            dlt.read_at_most(&LetterSelector::new().key("a"), 10, 3, |_, _| {})
                .expect("read"),
            dlt.read_at_most(&LetterSelector::new().key("a"), 10, u64::MAX, |_, _| {})
                .expect("read"),
        )
    })
    .await
    .unwrap();
    let offsets =
        |l: &kourier::dead_letter::Letters| l.letters.iter().map(|r| r.offset).collect::<Vec<_>>();
    assert_eq!(offsets(&two), [0, 1]);
    assert!(two.more);
    assert_eq!(
        (offsets(&first_three_read), first_three_read.read),
        (vec![0, 2], 3)
    );
    assert!(first_three_read.more);
    assert_eq!((offsets(&all_a), all_a.read), (vec![0, 2, 4], 5));
    assert!(!all_a.more);
}
