//! The `mail_notifier` example end to end, against the real broker, the real Redis and the
//! example's own SMTP server on loopback: the example's modules are compiled in here
//! (`tests/mail_notifier_example/modules.rs`), so this runs the very code
//! `cargo run --example mail_notifier -- demo` runs.
//!
//! It checks what a user of the notifier cares about: the SMTP server received exactly one mail
//! per unique valid event (none for the duplicate; the greylisted one once, after its `451`);
//! the dead-letter topic holds exactly the bad records, with the right failure kinds; the group
//! committed everything; and a re-run neither re-mails old events nor mails re-published ones.
//! Batch mode (`--batch`) is checked the same way, and that its mails really shared SMTP sessions.
//! Queue mode (`--queue`, feature `queue`: a share group) is checked the same way.
//!
//! Needs Kafka and Redis (`scripts/services up`); each test has its own topics and group.

mod support;

include!("mail_notifier_example/modules.rs");

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kourier::dead_letter::headers as dlt;

use crate::demo::{DemoConfig, Fate, Report};
use crate::mailer::Outcome;
use crate::notifier::Settings;
use crate::samples::{Expect, Payload};
use crate::support::{ReadRecord, bootstrap, redis_url, require_kafka, require_redis, unique_name};

const PARTITIONS: i32 = 6;

fn config(topic: &str, group: &str, outbox: &Path, run_id: &str) -> DemoConfig {
    DemoConfig {
        settings: Settings {
            bootstrap: bootstrap(),
            redis_url: redis_url(),
            topic: topic.to_owned(),
            group: group.to_owned(),
            partitions: PARTITIONS,
            retry_tiers: Vec::new(),
        },
        outbox: outbox.to_path_buf(),
        run_id: run_id.to_owned(),
        settle_timeout: Duration::from_secs(90),
        probes: ops_server::Probes::default(),
        outage: None,
        batch: false,
        queue: false,
    }
}

async fn run(config: DemoConfig) -> Report {
    let report = demo::run_demo(config, std::future::pending())
        .await
        .expect("the demo runs");
    assert!(
        report.settled,
        "not every record settled:{}",
        report.summary()
    );
    report
}

/// The modes the outage sample runs in: one by one, in batches, over a share group.
#[derive(Clone, Copy)]
enum Mode {
    Single,
    Batch,
    #[cfg(feature = "queue")]
    Queue,
}

/// Runs the demo with the outage sample (the SMTP server refuses connections for 3 s) in
/// `mode`, for run id `run_id` on topic and group names from `name`, and checks what every
/// mode promises: no surprise, and exactly one mail per valid event id (the outage's
/// included). Returns the topic, the group, the report and its summary.
async fn outage_run(name: &str, run_id: &str, mode: Mode) -> (String, String, Report, String) {
    require_kafka().await;
    require_redis().await;
    let topic = unique_name(name);
    let group = unique_name(name);
    let outbox = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique_name("outbox"));
    let mut config = config(&topic, &group, &outbox, run_id);
    match mode {
        Mode::Single => {}
        Mode::Batch => config.batch = true,
        #[cfg(feature = "queue")]
        Mode::Queue => config.queue = true,
    }
    config.outage = Some(Duration::from_secs(3));
    let report = run(config).await;
    let summary = report.summary();
    assert!(report.surprises().is_empty(), "{summary}");
    (topic, group, report, summary)
}

/// Exactly one mail per unique valid event id, the outage's included.
fn assert_each_valid_event_mailed_once(report: &Report, summary: &str) {
    let valid = ids_expecting(
        report,
        &[
            Expect::Mail,
            Expect::MailAfterRetry,
            Expect::Duplicate,
            Expect::MailAfterOutage,
        ],
    );
    assert_eq!(valid.len(), 12, "{summary}");
    assert_eq!(mailed_ids(report), valid, "{summary}");
}

/// The event ids of the samples with one of `expects`, sorted.
fn ids_expecting(report: &Report, expects: &[Expect]) -> Vec<String> {
    let mut ids: Vec<String> = report
        .published
        .iter()
        .filter(|p| expects.contains(&p.sample.expect))
        .map(|p| p.sample.event_id.clone())
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// The event ids of the mails the SMTP server accepted (from their `Message-ID`s), sorted,
/// duplicates kept.
fn mailed_ids(report: &Report) -> Vec<String> {
    let mut ids: Vec<String> = report
        .mails
        .iter()
        .map(|m| {
            let id = m
                .message_id
                .as_deref()
                .expect("every mail has a Message-ID");
            let (local, domain) = id.split_once('@').expect("Message-ID is local@domain");
            assert_eq!(domain, mailer::MESSAGE_ID_DOMAIN);
            local.to_owned()
        })
        .collect();
    ids.sort();
    ids
}

fn header_text(r: &ReadRecord, name: &str) -> String {
    let value = r
        .header(name)
        .unwrap_or_else(|| {
            panic!(
                "dead letter {}/{} lacks header {name}",
                r.partition, r.offset
            )
        })
        .unwrap_or_default();
    String::from_utf8_lossy(value).into_owned()
}

fn header_i64(r: &ReadRecord, name: &str) -> i64 {
    let v = r.header(name).flatten().unwrap_or_default();
    match v.len() {
        4 => i64::from(i32::from_be_bytes(v.try_into().unwrap())),
        8 => i64::from_be_bytes(v.try_into().unwrap()),
        n => panic!("header {name} has {n} bytes"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_valid_event_is_mailed_once_and_the_bad_ones_are_dead_lettered() {
    require_kafka().await;
    require_redis().await;
    let topic = unique_name("mail-notifier");
    let group = unique_name("mail-notifier");
    let outbox = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique_name("outbox"));
    let report = run(config(&topic, &group, &outbox, "t1")).await;
    let summary = report.summary();

    // The SMTP server: exactly one mail per unique valid event id.
    let valid = ids_expecting(
        &report,
        &[Expect::Mail, Expect::MailAfterRetry, Expect::Duplicate],
    );
    assert_eq!(
        valid,
        ["t1-01", "t1-02", "t1-03", "t1-06", "t1-08", "t1-09"]
    );
    assert_eq!(mailed_ids(&report), valid, "{summary}");
    // ... to the right recipients, each written to its own .eml file.
    for mail in &report.mails {
        let id = mail
            .message_id
            .as_deref()
            .unwrap()
            .split('@')
            .next()
            .unwrap();
        let sample = report
            .published
            .iter()
            .find(|p| p.sample.event_id == id)
            .unwrap();
        let Payload::Event(event) = &sample.sample.payload else {
            panic!("{id} was mailed but is not an event")
        };
        let address = event.to.rsplit('<').next().unwrap().trim_end_matches('>');
        assert_eq!(mail.to, [address.to_owned()], "{id}");
        assert_eq!(mail.from, "notifier@kourier.example");
        let eml = std::fs::read_to_string(&mail.path).expect("the .eml file exists");
        assert!(
            eml.contains(&format!("Subject: {}", event.subject)),
            "{eml}"
        );
    }
    let mut files: Vec<String> = std::fs::read_dir(outbox.join("t1"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    let expected_files: Vec<String> = valid.iter().map(|id| format!("{id}.eml")).collect();
    assert_eq!(files, expected_files);

    // The greylisted event: a transient 451 on attempt 1, sent on attempt 2, mailed once.
    let flaky = report
        .published
        .iter()
        .zip(&report.fates)
        .find(|(p, _)| p.sample.expect == Expect::MailAfterRetry)
        .unwrap();
    let Fate::Sent(calls) = flaky.1 else {
        panic!("the greylisted event was not sent:{summary}")
    };
    assert_eq!(calls.len(), 2, "{summary}");
    assert!(
        matches!(&calls[0].outcome, Outcome::Transient(e) if e.contains("451")),
        "{:?}",
        calls[0]
    );
    assert_eq!((calls[1].attempt, &calls[1].outcome), (2, &Outcome::Sent));

    // The duplicate: settled without a handler call.
    let dup = report
        .published
        .iter()
        .zip(&report.fates)
        .find(|(p, _)| p.sample.expect == Expect::Duplicate)
        .unwrap();
    assert!(matches!(dup.1, Fate::SkippedDuplicate), "{summary}");

    // The dead-letter topic, read on its own: exactly the bad records, with the right kinds,
    // their original key, value and headers, and where they came from.
    let letters = support::read_all(&format!("{topic}.dlt")).await;
    let mut kinds: BTreeMap<String, String> = BTreeMap::new();
    for letter in &letters {
        let id = header_text(letter, event::EVENT_ID_HEADER);
        let source = report
            .published
            .iter()
            .find(|p| p.sample.event_id == id)
            .unwrap_or_else(|| panic!("dead letter for unknown event {id}"));
        assert_eq!(header_text(letter, dlt::ORIGINAL_TOPIC), topic);
        assert_eq!(
            header_i64(letter, dlt::ORIGINAL_PARTITION),
            i64::from(source.partition)
        );
        assert_eq!(header_i64(letter, dlt::ORIGINAL_OFFSET), source.offset);
        assert_eq!(header_text(letter, dlt::ORIGINAL_CONSUMER_GROUP), group);
        assert_eq!(
            letter.key.as_deref(),
            Some(source.sample.user_id.as_bytes())
        );
        let value = match &source.sample.payload {
            Payload::Event(e) => serde_json::to_vec(e).unwrap(),
            Payload::Malformed(bytes) => bytes.clone(),
        };
        assert_eq!(letter.value.as_deref(), Some(value.as_slice()), "{id}");
        let kind = header_text(letter, dlt::FAILURE_KIND);
        let attempts = header_text(letter, dlt::ATTEMPTS);
        let error = header_text(letter, dlt::EXCEPTION_MESSAGE);
        match source.sample.expect {
            Expect::Malformed => assert_eq!(attempts, "0", "{id}: the handler never ran"),
            Expect::Rejected => {
                assert_eq!(attempts, "1");
                assert!(error.contains("550"), "{error}");
            }
            Expect::InvalidAddress => {
                assert_eq!(attempts, "1");
                assert!(error.contains("invalid recipient address"), "{error}");
            }
            other => panic!("{id} ({other:?}) was dead-lettered: {error}"),
        }
        assert!(
            kinds.insert(id, kind).is_none(),
            "two dead letters for one record"
        );
    }
    assert_eq!(
        kinds,
        BTreeMap::from([
            ("t1-04".to_owned(), "decode".to_owned()),
            ("t1-05".to_owned(), "permanent".to_owned()),
            ("t1-07".to_owned(), "permanent".to_owned()),
        ]),
        "{summary}"
    );

    // Everything was committed: a restart would not handle any of it again.
    let committed = support::committed_offsets(&group, &topic, PARTITIONS).await;
    for p in &report.published {
        let c = committed[&p.partition].unwrap_or(-1);
        assert!(
            c > p.offset,
            "{}/{}@{} not committed ({c})",
            topic,
            p.partition,
            p.offset
        );
    }
    assert!(report.surprises().is_empty(), "{summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_runs_mail_only_new_events_and_republished_events_are_skipped() {
    require_kafka().await;
    require_redis().await;
    let topic = unique_name("mail-notifier-rerun");
    let group = unique_name("mail-notifier-rerun");
    let outbox = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique_name("outbox"));

    let first = run(config(&topic, &group, &outbox, "a")).await;
    assert!(first.surprises().is_empty(), "{}", first.summary());

    // A second run, as `demo` does it: a new run id, same topic and group. It starts after the
    // first run's commits, so nothing of the first run is handled again.
    let second = run(config(&topic, &group, &outbox, "b")).await;
    assert!(second.surprises().is_empty(), "{}", second.summary());
    assert!(second.earlier.is_empty(), "{}", second.summary());
    assert_eq!(
        mailed_ids(&second),
        ["b-01", "b-02", "b-03", "b-06", "b-08", "b-09"]
    );

    // The first run's events published again (same event ids): Redis remembers each event's
    // outcome, so none is mailed and the rejected ones are not dead-lettered twice (one dead
    // letter per event); only the malformed record, which has no event id to remember it
    // by (its key comes from the decoded event), is dead-lettered again.
    let third = run(config(&topic, &group, &outbox, "a")).await;
    assert!(mailed_ids(&third).is_empty(), "{}", third.summary());
    for (p, fate) in third.published.iter().zip(&third.fates) {
        match p.sample.expect {
            Expect::Mail | Expect::MailAfterRetry | Expect::Duplicate | Expect::MailAfterOutage => {
                assert!(
                    matches!(fate, Fate::SkippedDuplicate),
                    "{}: {fate:?}",
                    p.sample.event_id
                );
            }
            Expect::Rejected | Expect::InvalidAddress => {
                assert!(
                    matches!(fate, Fate::SkippedDuplicate),
                    "{}: {fate:?}",
                    p.sample.event_id
                );
            }
            Expect::Malformed => {
                assert!(
                    matches!(fate, Fate::DeadLettered(..)),
                    "{}: {fate:?}",
                    p.sample.event_id
                );
            }
        }
    }
    let letters = support::read_all(&format!("{topic}.dlt")).await;
    assert_eq!(
        letters.len(),
        7,
        "3 dead letters per run, and the malformed record's again"
    );
}

/// The outage sample: the SMTP server refuses connections for 3 s while six mails come in.
/// The breaker opens, probes and closes; each of the six is mailed exactly once after the
/// server is back, none is dead-lettered, and no refused call used up an attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_smtp_outage_dead_letters_nothing_and_mails_each_once_after_it() {
    let (topic, _, report, summary) = outage_run("mail-notifier-outage", "o1", Mode::Single).await;
    assert!(report.outage.is_some());

    let outage = ids_expecting(&report, &[Expect::MailAfterOutage]);
    assert_eq!(
        outage,
        ["o1-11", "o1-12", "o1-13", "o1-14", "o1-15", "o1-16"]
    );
    let mailed = mailed_ids(&report);
    for id in &outage {
        assert_eq!(
            mailed.iter().filter(|m| *m == id).count(),
            1,
            "{id} mailed once:{summary}"
        );
    }
    // Only the three bad sample records are dead-lettered: nothing for the outage.
    let letters = support::read_all(&format!("{topic}.dlt")).await;
    assert_eq!(letters.len(), 3, "{summary}");
    // Refused calls did not count as attempts: every outage mail went out as attempt 1.
    let refused: usize = report
        .published
        .iter()
        .zip(&report.fates)
        .filter(|(p, _)| p.sample.expect == Expect::MailAfterOutage)
        .map(|(p, fate)| {
            let Fate::Sent(calls) = fate else {
                panic!("{} not sent:{summary}", p.sample.event_id)
            };
            assert!(calls.iter().all(|c| c.attempt == 1), "{calls:?}");
            calls
                .iter()
                .filter(|c| matches!(c.outcome, Outcome::Unavailable(_)))
                .count()
        })
        .sum();
    assert!(
        refused >= 1,
        "the outage refused at least one call:{summary}"
    );
    let breaker = report.breaker.as_ref().expect("the notifier has a breaker");
    assert!(breaker.opened >= 1, "{breaker:?}");
    assert_eq!(breaker.state, kourier::BreakerState::Closed, "{breaker:?}");
}

/// Batch mode (`--batch`), with the outage sample: the bulk mailer sends the mails of several
/// records over one SMTP session and answers per mail. Each valid event is mailed exactly once,
/// each user's mails arrive in publishing order, the `550` and the invalid address are
/// dead-lettered on their own (their batch-mates sent), the greylisted mail is retried on its
/// own, the outage dead-letters nothing, and batching really happened: fewer bulk calls and
/// SMTP sessions than mails, and a session that carried several mails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_mode_mails_each_event_once_over_shared_smtp_sessions() {
    let (topic, _, report, summary) = outage_run("mail-notifier-batch", "k1", Mode::Batch).await;
    assert_each_valid_event_mailed_once(&report, &summary);

    // Key order: each user's mails reached the server in publishing order.
    let arrival = |id: &str| {
        report
            .mails
            .iter()
            .position(|m| {
                m.message_id
                    .as_deref()
                    .is_some_and(|m| m.starts_with(&format!("{id}@")))
            })
            .unwrap_or_else(|| panic!("{id} was not mailed:{summary}"))
    };
    for (first, then) in [
        ("k1-01", "k1-03"),
        ("k1-03", "k1-11"),
        ("k1-02", "k1-09"),
        ("k1-09", "k1-12"),
        ("k1-08", "k1-13"),
        ("k1-06", "k1-14"),
    ] {
        assert!(
            arrival(first) < arrival(then),
            "{first} before {then}:{summary}"
        );
    }

    // Dead letters: exactly the three bad records, each failing on its own.
    let mut kinds: BTreeMap<String, (String, String)> = BTreeMap::new();
    for letter in support::read_all(&format!("{topic}.dlt")).await {
        let id = header_text(&letter, event::EVENT_ID_HEADER);
        let kind = header_text(&letter, dlt::FAILURE_KIND);
        let attempts = header_text(&letter, dlt::ATTEMPTS);
        assert!(
            kinds.insert(id, (kind, attempts)).is_none(),
            "two dead letters for one record:{summary}"
        );
    }
    let letter = |kind: &str, attempts: &str| (kind.to_owned(), attempts.to_owned());
    assert_eq!(
        kinds,
        BTreeMap::from([
            ("k1-04".to_owned(), letter("decode", "0")),
            ("k1-05".to_owned(), letter("permanent", "1")),
            ("k1-07".to_owned(), letter("permanent", "1")),
        ]),
        "{summary}"
    );

    // The greylisted mail: its 451 failed it alone; sent on attempt 2.
    let (_, flaky) = report
        .published
        .iter()
        .zip(&report.fates)
        .find(|(p, _)| p.sample.expect == Expect::MailAfterRetry)
        .unwrap();
    let Fate::Sent(calls) = flaky else {
        panic!("the greylisted event was not sent:{summary}")
    };
    assert!(
        matches!(&calls[0].outcome, Outcome::Transient(e) if e.contains("451")),
        "{calls:?}"
    );
    assert_eq!(calls.last().map(|c| c.attempt), Some(2), "{calls:?}");

    // Batching happened: every handler attempt went through a bulk call, fewer bulk calls
    // than mail attempts, and the server saw fewer sessions than mails, one of them carrying
    // several mails.
    let calls = &report.bulk_calls;
    let in_bulk: usize = calls.iter().map(|c| c.mails).sum();
    let attempts: usize = report
        .fates
        .iter()
        .map(|f| match f {
            Fate::Sent(c) | Fate::DeadLettered(_, c) | Fate::Unsettled(c) => c.len(),
            Fate::SkippedDuplicate => 0,
        })
        .sum();
    assert_eq!(in_bulk, attempts, "{calls:?}");
    assert!(
        calls.len() < in_bulk,
        "{} bulk calls for {in_bulk} mails",
        calls.len()
    );
    let mut per_session: BTreeMap<u64, usize> = BTreeMap::new();
    for mail in &report.mails {
        *per_session.entry(mail.session).or_default() += 1;
    }
    let widest = per_session.values().copied().max().unwrap_or(0);
    assert!(
        per_session.len() < report.mails.len() && widest >= 2,
        "{} sessions for {} mails, at most {widest} per session: {per_session:?}",
        per_session.len(),
        report.mails.len()
    );
    eprintln!(
        "batch mode: {} bulk calls for {in_bulk} mail attempts (sizes {:?}); {} SMTP sessions \
         for {} mails (mails per session {:?})",
        calls.len(),
        calls.iter().map(|c| c.mails).collect::<Vec<_>>(),
        per_session.len(),
        report.mails.len(),
        per_session.values().collect::<Vec<_>>()
    );
}

/// Queue mode (`--queue`): the same mailer, Redis idempotency and dead-letter topic over a
/// share group (on the shared broker: Kafka 4.2+ with share groups on), with the outage
/// sample. Each valid event is mailed exactly once (either copy of the duplicated event, the
/// other skipped), the greylisted mail after its `451`, the malformed record and the two
/// refused addresses are dead-lettered (kourier's own letters, naming the share group), and
/// the outage dead-letters nothing: the refused mails were held and sent once the server was
/// back.
#[cfg(feature = "queue")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_mode_mails_each_event_once_and_dead_letters_the_bad_ones() {
    let (topic, group, report, summary) =
        outage_run("mail-notifier-queue", "q1", Mode::Queue).await;
    assert_each_valid_event_mailed_once(&report, &summary);

    // The duplicated event: one copy mailed on its first call, the other skipped.
    let copies: Vec<&Fate> = report
        .published
        .iter()
        .zip(&report.fates)
        .filter(|(p, _)| {
            report
                .published
                .iter()
                .filter(|q| q.sample.event_id == p.sample.event_id)
                .count()
                > 1
        })
        .map(|(_, f)| f)
        .collect();
    assert_eq!(copies.len(), 2, "{summary}");
    assert_eq!(
        copies
            .iter()
            .filter(|f| matches!(f, Fate::Sent(c) if c.len() == 1))
            .count(),
        1,
        "{summary}"
    );
    assert_eq!(
        copies
            .iter()
            .filter(|f| matches!(f, Fate::SkippedDuplicate))
            .count(),
        1,
        "{summary}"
    );

    // The greylisted mail: a 451 on attempt 1, sent on attempt 2.
    let (_, flaky) = report
        .published
        .iter()
        .zip(&report.fates)
        .find(|(p, _)| p.sample.expect == Expect::MailAfterRetry)
        .unwrap();
    let Fate::Sent(calls) = flaky else {
        panic!("the greylisted event was not sent:{summary}")
    };
    assert!(
        matches!(&calls[0].outcome, Outcome::Transient(e) if e.contains("451")),
        "{calls:?}"
    );
    assert_eq!(
        calls.iter().map(|c| c.attempt).collect::<Vec<_>>(),
        [1, 2],
        "{calls:?}"
    );

    // The outage: its mails were refused at least once between them, held, then sent.
    let refused = report
        .published
        .iter()
        .zip(&report.fates)
        .filter(|(p, _)| p.sample.expect == Expect::MailAfterOutage)
        .flat_map(|(_, f)| match f {
            Fate::Sent(c) | Fate::DeadLettered(_, c) | Fate::Unsettled(c) => c.as_slice(),
            Fate::SkippedDuplicate => &[],
        })
        .filter(|c| matches!(c.outcome, Outcome::Unavailable(_)))
        .count();
    assert!(refused >= 1, "no outage mail was refused:{summary}");

    // Dead letters: exactly the three bad records, once each, from the share group.
    let mut kinds: BTreeMap<String, (String, String)> = BTreeMap::new();
    for letter in support::read_all(&format!("{topic}.dlt")).await {
        let id = header_text(&letter, event::EVENT_ID_HEADER);
        assert_eq!(header_text(&letter, dlt::ORIGINAL_TOPIC), topic);
        assert_eq!(
            header_text(&letter, dlt::ORIGINAL_CONSUMER_GROUP),
            format!("{group}-queue")
        );
        let kind = header_text(&letter, dlt::FAILURE_KIND);
        let attempts = header_text(&letter, dlt::ATTEMPTS);
        assert!(
            kinds.insert(id, (kind, attempts)).is_none(),
            "two dead letters for one record:{summary}"
        );
    }
    let letter = |kind: &str, attempts: &str| (kind.to_owned(), attempts.to_owned());
    assert_eq!(
        kinds,
        BTreeMap::from([
            ("q1-04".to_owned(), letter("decode", "0")),
            ("q1-05".to_owned(), letter("permanent", "1")),
            ("q1-07".to_owned(), letter("permanent", "1")),
        ]),
        "{summary}"
    );
}
