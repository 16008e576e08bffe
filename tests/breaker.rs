//! The outage breaker (delivery rule 16 in the crate docs) against the real broker: a downstream outage makes
//! records wait instead of using up their attempts and filling the dead-letter topic.
//!
//! The handler calls a simulated downstream that the test takes down and brings back. Each
//! test prints its figures (calls while down, probe rate, time to close after recovery) for
//! the report; the assertions are about outcomes (dead letters, successes per record, group
//! membership), never about timing.
//!
//! Needs Kafka (`scripts/services up`); each test has its own topics and group.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use kourier::dead_letter::headers as dlt;
use kourier::{
    BreakerPolicy, BreakerState, BreakerStatus, ConsumerMonitor, ConsumerSnapshot, DedupKey,
    HandlerError, Idempotency, InMemoryIdempotencyStore, Message, ProcessingOrder, handler_fn,
};
use serde::Deserialize;
use support::TestRecord;
use support::consumer::{self, Running, setup};

#[derive(Debug, Deserialize)]
struct Job {
    id: usize,
    /// Fails permanently (a validation error, before the downstream is called).
    #[serde(default)]
    invalid: bool,
}

/// Keys `user-0` .. `user-96`; an invalid job has a key of its own.
fn job(id: usize, invalid: bool) -> TestRecord {
    let key = if invalid {
        "invalid".to_owned()
    } else {
        format!("user-{}", id % 97)
    };
    TestRecord::new()
        .key(key)
        .value(format!(r#"{{"id":{id},"invalid":{invalid}}}"#))
}

/// A downstream the test takes down and brings back, and what the handler saw.
struct Downstream {
    down: AtomicBool,
    /// Calls hang (neither succeed nor fail) while set.
    hanging: AtomicBool,
    /// Handler calls that reached the downstream, and those made while it was down.
    calls: AtomicU64,
    calls_while_down: AtomicU64,
    /// Successful calls per record id.
    successes: Vec<AtomicU32>,
    /// Whether the downstream was down when each invalid record's call returned.
    invalid_calls: Mutex<Vec<bool>>,
    /// An invalid record's call has begun: it waits until the downstream is down.
    invalid_started: AtomicBool,
    /// Whether transient failures say `unavailable` (else plain transient).
    unavailable: bool,
}

impl Downstream {
    fn new(records: usize, unavailable: bool) -> Arc<Self> {
        Arc::new(Downstream {
            down: AtomicBool::new(false),
            hanging: AtomicBool::new(false),
            calls: AtomicU64::new(0),
            calls_while_down: AtomicU64::new(0),
            successes: (0..records).map(|_| AtomicU32::new(0)).collect(),
            invalid_calls: Mutex::new(Vec::new()),
            invalid_started: AtomicBool::new(false),
            unavailable,
        })
    }

    async fn call(&self, job: &Job) -> Result<(), HandlerError> {
        if job.invalid {
            self.invalid_started.store(true, Ordering::SeqCst);
        }
        while self.hanging.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let down = self.down.load(Ordering::SeqCst);
        if job.invalid {
            self.invalid_calls.lock().unwrap().push(down);
            return Err(HandlerError::permanent(format!("job {}: invalid", job.id)));
        }
        self.calls.fetch_add(1, Ordering::SeqCst);
        if down {
            self.calls_while_down.fetch_add(1, Ordering::SeqCst);
            return Err(if self.unavailable {
                HandlerError::unavailable("connection refused")
            } else {
                HandlerError::transient("connection refused")
            });
        }
        self.successes[job.id].fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn handled(&self) -> usize {
        self.successes
            .iter()
            .filter(|n| n.load(Ordering::SeqCst) > 0)
            .count()
    }

    /// Record ids handled other than exactly once (`valid` only).
    fn not_exactly_once(&self, valid: impl Fn(usize) -> bool) -> Vec<(usize, u32)> {
        self.successes
            .iter()
            .enumerate()
            .filter(|(id, _)| valid(*id))
            .map(|(id, n)| (id, n.load(Ordering::SeqCst)))
            .filter(|(_, n)| *n != 1)
            .collect()
    }
}

/// The breaker of these tests: the defaults, with a 1 s open interval doubling to 4 s (so a
/// test does not wait a minute for its probe).
fn breaker() -> BreakerPolicy {
    BreakerPolicy::default().with_open_interval(Duration::from_secs(1), Duration::from_secs(4))
}

/// Stops `c` at the end of a run begun at `started`: how long the run took, the consumer's
/// last snapshot and its breaker's status then.
async fn finish(c: Running, started: Instant) -> (Duration, ConsumerSnapshot, BreakerStatus) {
    let took = started.elapsed();
    let end = c.monitor.snapshot();
    c.stop().await;
    let b = end.breaker.clone().expect("a breaker");
    (took, end, b)
}

/// How often the breaker opened, probed and held a failed call.
fn breaker_counts(b: &BreakerStatus) -> String {
    format!(
        "opened {} times, {} probes, {} failed calls held",
        b.opened, b.probes, b.held_failures
    )
}

/// The transitions from `from` to `to` among `b.recent`, which must hold every transition
/// of the run (fewer than [`BreakerStatus::RECENT`]).
fn transitions(b: &BreakerStatus, from: BreakerState, to: BreakerState) -> usize {
    assert!(
        b.recent.len() < BreakerStatus::RECENT,
        "recent transitions were dropped: {b:?}"
    );
    b.recent
        .iter()
        .filter(|t| t.from == from && t.to == to)
        .count()
}

/// Watches the consumer's assignment while the test runs: it must never change once all
/// `partitions` are assigned (no revoke: the consumer never left its group).
struct Membership {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl Membership {
    fn watch(monitor: ConsumerMonitor, partitions: usize) -> Membership {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut changes = Vec::new();
            let mut full = None;
            while !flag.load(Ordering::SeqCst) {
                let assigned = monitor.snapshot().assigned;
                match &full {
                    None if assigned.len() == partitions => full = Some(assigned),
                    Some(f) if *f != assigned => {
                        changes.push(format!("{f:?} -> {assigned:?}"));
                        full = Some(assigned);
                    }
                    _ => {}
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            changes
        });
        Membership { stop, task }
    }

    async fn changes(self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("membership watcher")
    }
}

/// With `RUST_LOG` set, the consumer's logs go to the test's output (to diagnose a stall).
fn logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// Waits (at most `bound`) until `done`, failing the test with `what` otherwise.
async fn within(what: &str, bound: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + bound;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "stalled: {what} not within {bound:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A 20 s outage over a backlog of 10,000 records, one of them invalid: the outage
/// dead-letters nothing, the invalid record (in flight when the outage begins) is
/// dead-lettered during the outage, every other record is handled exactly once, and the
/// consumer keeps its partitions throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_20s_outage_over_10k_records_dead_letters_nothing_and_handles_each_once() {
    const RECORDS: usize = 10_000;
    const PARTITIONS: i32 = 8;
    const INVALID: usize = 5;
    const OUTAGE: Duration = Duration::from_secs(20);
    logs();
    let (topic, group, dlt_topic) = setup("breaker-outage", PARTITIONS).await;
    support::produce(
        &topic,
        (0..RECORDS).map(|id| job(id, id == INVALID)).collect(),
    )
    .await;

    // The downstream hangs at first: every lane's first record is in flight (98 lanes, within
    // max_in_flight), the invalid one included, when the outage begins.
    let downstream = Downstream::new(RECORDS, false);
    downstream.hanging.store(true, Ordering::SeqCst);
    let d = downstream.clone();
    let handler = handler_fn(move |m: Message<Job>| {
        let d = d.clone();
        async move { d.call(m.event()).await }
    });
    let c = Running::start(
        consumer::builder(handler, &topic, &group)
            .ordering(ProcessingOrder::Key)
            .max_in_flight(128)
            .breaker(breaker())
            // A claim left held while its record waits would make the retry wait out the
            // lease (60 s): the test would stall.
            .idempotency(Idempotency::new(
                Arc::new(InMemoryIdempotencyStore::new()),
                DedupKey::from_fn(|m: &Message<Job>| Some(m.event().id.to_string())),
            )),
    );
    let membership = Membership::watch(c.monitor.clone(), PARTITIONS as usize);

    // The outage begins once the invalid record is in flight, and lasts 20 s.
    within("the invalid record's call", Duration::from_secs(60), || {
        downstream.invalid_started.load(Ordering::SeqCst)
    })
    .await;
    downstream.down.store(true, Ordering::SeqCst);
    downstream.hanging.store(false, Ordering::SeqCst);
    let outage_began = Instant::now();
    let outage_began_at = SystemTime::now();
    let handled_before = downstream.handled();
    tokio::time::sleep(OUTAGE).await;
    let snapshot = c.monitor.snapshot();
    let b = snapshot.breaker.clone().expect("a breaker");
    let calls_while_down = downstream.calls_while_down.load(Ordering::SeqCst);
    downstream.down.store(false, Ordering::SeqCst);
    let recovered = SystemTime::now();
    assert_eq!(
        b.state,
        BreakerState::Open,
        "open at the end of the outage: {b:?}"
    );
    let handled_during = downstream.handled() - handled_before;

    within(
        "every valid record handled after recovery",
        Duration::from_secs(90),
        || downstream.handled() == RECORDS - 1,
    )
    .await;
    let all_done = outage_began.elapsed();
    let end = c.monitor.snapshot();
    let membership = membership.changes().await;
    let abandoned = end.abandoned;
    c.stop().await;

    // The figures.
    let b = end.breaker.expect("a breaker");
    let opened_at = b
        .recent
        .iter()
        .find(|t| t.to == BreakerState::Open)
        .expect("it opened")
        .at;
    let closed_at = b
        .recent
        .iter()
        .rev()
        .find(|t| t.to == BreakerState::Closed)
        .expect("it closed")
        .at;
    let open_while_down = recovered.duration_since(opened_at).unwrap_or_default();
    let probes_while_down = b
        .recent
        .iter()
        .filter(|t| t.to == BreakerState::HalfOpen && t.at < recovered)
        .count();
    eprintln!(
        "outage figures: {RECORDS} records, {handled_before} handled before the outage, {handled_during} \
         during it; {calls_while_down} downstream calls during the 20 s outage \
         (without a breaker: {} attempts), breaker opened {:?} after the outage began; \
         {probes_while_down} probes in {:.1} s open = {:.2} probes/s; opened {} times, {} probes in all, \
         {} failed calls held; closed {:.2} s after the downstream returned; all records done {:.1} s \
         after the outage began; dead letters {}; abandoned {abandoned}; assignment changes {}",
        (RECORDS - 1 - handled_before) * 4,
        opened_at
            .duration_since(outage_began_at)
            .unwrap_or_default(),
        open_while_down.as_secs_f64(),
        probes_while_down as f64 / open_while_down.as_secs_f64().max(0.001),
        b.opened,
        b.probes,
        b.held_failures,
        closed_at
            .duration_since(recovered)
            .unwrap_or_default()
            .as_secs_f64(),
        all_done.as_secs_f64(),
        end.dead_lettered.total(),
        membership.len(),
    );

    // Zero dead letters caused by the outage: the only letter is the invalid record's.
    let letters = support::read_at_least(&dlt_topic, 1, Duration::from_secs(30)).await;
    assert_eq!(letters.len(), 1, "only the invalid record is dead-lettered");
    assert_eq!(letters[0].header_str(dlt::FAILURE_KIND), "permanent");
    assert!(
        String::from_utf8_lossy(letters[0].value.as_deref().unwrap_or_default())
            .contains(&format!(r#""id":{INVALID}"#))
    );
    assert_eq!(end.dead_lettered.total(), 1);
    assert_eq!(end.dead_lettered.retries_exhausted, 0);
    // The invalid record failed during the outage and still went to the dead-letter topic.
    assert_eq!(*downstream.invalid_calls.lock().unwrap(), [true]);
    assert_eq!(
        handled_during, 0,
        "nothing succeeds while the downstream is down"
    );
    // Every valid record handled exactly once after recovery.
    assert_eq!(downstream.not_exactly_once(|id| id != INVALID), []);
    // The breaker kept the downstream quiet: far fewer calls than the attempts an outage
    // costs without it.
    assert!(
        calls_while_down < 1_000,
        "{calls_while_down} calls while the downstream was down"
    );
    // One outage, one opening from closed and one close; every other opening followed a
    // failed probe, and every opening ended in a probe (the last one closed it).
    use BreakerState::{Closed, HalfOpen, Open};
    assert_eq!(transitions(&b, Closed, Open), 1, "{b:?}");
    assert_eq!(transitions(&b, HalfOpen, Closed), 1, "{b:?}");
    assert_eq!(
        transitions(&b, HalfOpen, Open) as u64,
        b.opened - 1,
        "{b:?}"
    );
    assert_eq!(b.probes, b.opened, "{b:?}");
    assert_eq!(b.recent.len() as u64, b.opened + b.probes + 1, "{b:?}");
    // How many calls failed before it opened depends on timing (the calls in flight then);
    // the breaker can hold only calls that failed.
    assert!(
        (1..=calls_while_down).contains(&b.held_failures),
        "{} held of {calls_while_down} failed",
        b.held_failures
    );
    // The consumer never left its group.
    assert_eq!(membership, Vec::<String>::new());
    assert_eq!(abandoned, 0, "no record was given up (no revoke)");
}

/// A downstream that goes down three times while 3,000 records are handled — each time
/// until the breaker opened, then up until it closed: nothing is dead-lettered, every record
/// is handled exactly once within a bound (the breaker neither floods the DLT nor stalls),
/// and the breaker opened exactly once per outage and closed after each (its first probe,
/// a second after opening, finds the downstream back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_downstream_neither_floods_the_dlt_nor_stalls() {
    const RECORDS: usize = 3_000;
    const PARTITIONS: i32 = 4;
    const OUTAGES: usize = 3;
    let (topic, group, dlt_topic) = setup("breaker-flap", PARTITIONS).await;
    support::produce(&topic, (0..RECORDS).map(|id| job(id, false)).collect()).await;

    // The handler is slow enough (20 ms a call) that the backlog spans the outages.
    let downstream = Downstream::new(RECORDS, true);
    let d = downstream.clone();
    let handler = handler_fn(move |m: Message<Job>| {
        let d = d.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            d.call(m.event()).await
        }
    });
    let c = Running::start(
        consumer::builder(handler, &topic, &group)
            .ordering(ProcessingOrder::Key)
            .max_in_flight(16)
            .breaker(breaker()),
    );
    let state = || c.monitor.snapshot().breaker.map(|b| b.state);
    let started = Instant::now();
    for outage in 0..OUTAGES {
        within("records flowing", Duration::from_secs(60), || {
            downstream.handled() > outage * 20
        })
        .await;
        downstream.down.store(true, Ordering::SeqCst);
        within("the breaker open", Duration::from_secs(30), || {
            state() == Some(BreakerState::Open)
        })
        .await;
        downstream.down.store(false, Ordering::SeqCst);
        within("the breaker closed", Duration::from_secs(30), || {
            state() == Some(BreakerState::Closed)
        })
        .await;
    }
    within(
        "every record handled after the outages",
        Duration::from_secs(100),
        || downstream.handled() == RECORDS,
    )
    .await;
    let (took, end, b) = finish(c, started).await;

    eprintln!(
        "flapping figures: {RECORDS} records in {:.1} s over {OUTAGES} outages; breaker {}; \
         downstream calls while down {}; dead letters {}; retried {}",
        took.as_secs_f64(),
        breaker_counts(&b),
        downstream.calls_while_down.load(Ordering::SeqCst),
        end.dead_lettered.total(),
        end.retried,
    );
    assert_eq!(
        end.dead_lettered.total(),
        0,
        "the flapping dead-lettered records"
    );
    assert!(support::read_all(&dlt_topic).await.is_empty());
    assert_eq!(downstream.not_exactly_once(|_| true), []);
    use BreakerState::{Closed, HalfOpen, Open};
    assert_eq!(transitions(&b, Closed, Open), OUTAGES, "{b:?}");
    assert_eq!(transitions(&b, HalfOpen, Closed), OUTAGES, "{b:?}");
    assert_eq!(transitions(&b, HalfOpen, Open), 0, "no probe failed: {b:?}");
    assert_eq!((b.opened, b.probes), (OUTAGES as u64, OUTAGES as u64));
}

/// Records that fail on their own (not because of the downstream) open the breaker, but
/// cannot keep it open: other records probe, one succeeds, the breaker closes, and the
/// failing records use up their attempts and are dead-lettered as without a breaker. (The
/// fault-injection runner's `--breaker` run stalled on this before: the held records took
/// every probe and failed it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_failing_on_their_own_cannot_keep_the_breaker_open() {
    const RECORDS: usize = 600;
    const BAD: usize = 3; // ids 0, 1, 2 always fail transiently
    let (topic, group, dlt_topic) = setup("breaker-own", 3).await;
    support::produce(&topic, (0..RECORDS).map(|id| job(id, false)).collect()).await;

    let successes: Arc<Vec<AtomicU32>> =
        Arc::new((0..RECORDS).map(|_| AtomicU32::new(0)).collect());
    let bad_failures = Arc::new(AtomicU32::new(0));
    let handler = {
        let (successes, bad_failures) = (successes.clone(), bad_failures.clone());
        handler_fn(move |m: Message<Job>| {
            let (successes, bad_failures) = (successes.clone(), bad_failures.clone());
            async move {
                let id = m.event().id;
                if id < BAD {
                    bad_failures.fetch_add(1, Ordering::SeqCst);
                    return Err(HandlerError::transient(format!("job {id}: mailbox full")));
                }
                // The good records wait until the bad ones have failed once each: the
                // breaker's first calls are their failures, so it opens.
                while bad_failures.load(Ordering::SeqCst) < BAD as u32 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                successes[id].fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
    };
    let c = Running::start(
        consumer::builder(handler, &topic, &group)
            .ordering(ProcessingOrder::Key)
            .retry_policy(kourier::RetryPolicy::fixed(Duration::from_millis(100), 3))
            .breaker(breaker()),
    );
    let handled = || {
        successes
            .iter()
            .filter(|n| n.load(Ordering::SeqCst) > 0)
            .count()
    };
    let started = Instant::now();
    within(
        "every good record handled and the bad ones dead-lettered",
        Duration::from_secs(60),
        || handled() == RECORDS - BAD && c.monitor.snapshot().dead_lettered.total() == BAD as u64,
    )
    .await;
    let (took, _, b) = finish(c, started).await;

    eprintln!(
        "own-failure figures: {RECORDS} records, {BAD} always failing: done in {:.1} s; breaker {}; \
         the bad records' calls {}",
        took.as_secs_f64(),
        breaker_counts(&b),
        bad_failures.load(Ordering::SeqCst),
    );
    // How often their failures open it depends on how their retries meet the other
    // records' calls; the point is that it opened and that every opening ended closed.
    use BreakerState::{Closed, HalfOpen, Open};
    let opened = transitions(&b, Closed, Open);
    assert!(opened >= 1, "their failures opened it: {b:?}");
    assert_eq!(transitions(&b, HalfOpen, Closed), opened, "{b:?}");
    assert_eq!(b.state, Closed, "and it closed: {b:?}");
    let letters = support::read_at_least(&dlt_topic, BAD, Duration::from_secs(30)).await;
    assert_eq!(letters.len(), BAD);
    for letter in &letters {
        assert_eq!(letter.header_str(dlt::FAILURE_KIND), "retries-exhausted");
        assert_eq!(letter.header_str(dlt::ATTEMPTS), "4", "all attempts used");
    }
    let ids: Vec<usize> = successes
        .iter()
        .enumerate()
        .filter(|(id, n)| *id >= BAD && n.load(Ordering::SeqCst) != 1)
        .map(|(id, _)| id)
        .collect();
    assert_eq!(
        ids,
        Vec::<usize>::new(),
        "every good record handled exactly once"
    );
}

/// Records failing on their own that are all that is left (nothing else to probe) close
/// the breaker after `probes_per_record` failed probes of theirs in a row *in all*, not
/// that many each one after another, and are then dead-lettered by their retry policy. (The
/// compose fault run failed on this: a broker restart opened the breaker with only three
/// always-failing records left, which held it open past the runner's deadline.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_left_alone_failing_on_their_own_close_it_after_probes_per_record_in_all() {
    const BAD: usize = 3;
    const PROBES: u32 = 3;
    let (topic, group, dlt_topic) = setup("breaker-left-alone", 3).await;
    support::produce(&topic, (0..BAD).map(|id| job(id, false)).collect()).await;
    let calls = Arc::new(AtomicU32::new(0));
    let handler = {
        let calls = calls.clone();
        handler_fn(move |m: Message<Job>| {
            calls.fetch_add(1, Ordering::SeqCst);
            let id = m.event().id;
            async move { Err::<(), _>(HandlerError::transient(format!("job {id}: mailbox full"))) }
        })
    };
    let c = Running::start(
        consumer::builder(handler, &topic, &group)
            .ordering(ProcessingOrder::Key)
            .retry_policy(kourier::RetryPolicy::fixed(Duration::from_millis(100), 2))
            .breaker(
                BreakerPolicy::default()
                    .with_open_interval(Duration::from_millis(500), Duration::from_secs(1))
                    .with_probes_per_record(PROBES),
            ),
    );
    let started = Instant::now();
    within(
        "the three records dead-lettered",
        Duration::from_secs(60),
        || c.monitor.snapshot().dead_lettered.total() == BAD as u64,
    )
    .await;
    let (took, _, b) = finish(c, started).await;
    eprintln!(
        "left-alone figures: {BAD} records always failing, {PROBES} probes per record: done in {:.1} s; breaker {}; their calls {}",
        took.as_secs_f64(),
        breaker_counts(&b),
        calls.load(Ordering::SeqCst),
    );
    use BreakerState::{Closed, HalfOpen, Open};
    assert_eq!(
        transitions(&b, Closed, Open),
        1,
        "their failures opened it: {b:?}"
    );
    assert_eq!(transitions(&b, HalfOpen, Closed), 1, "and it closed: {b:?}");
    assert_eq!(b.state, Closed, "{b:?}");
    // Records that had not failed in the outage yet probe first (at most the two whose
    // failures opened it before being held), then PROBES in a row by held ones close it.
    // Probing each record's share in turn took BAD × PROBES.
    assert!(
        b.probes <= u64::from(PROBES) + 2,
        "{} probes: {b:?}",
        b.probes
    );
    let letters = support::read_at_least(&dlt_topic, BAD, Duration::from_secs(30)).await;
    assert_eq!(letters.len(), BAD);
    for letter in &letters {
        assert_eq!(letter.header_str(dlt::FAILURE_KIND), "retries-exhausted");
    }
}

/// The consumer of the shutdown and rebalance tests: key order, the test breaker, and long
/// shutdown and revoke timeouts, so that a wait the breaker failed to cancel would show.
fn patient<H>(handler: H, topic: &str, group: &str) -> kourier::RetryingConsumerBuilder<H>
where
    H: kourier::Handler<Event = Job>,
{
    consumer::builder(handler, topic, group)
        .ordering(ProcessingOrder::Key)
        .breaker(breaker())
        .shutdown_timeout(Duration::from_secs(60))
        .revoke_timeout(Duration::from_secs(60))
}

fn calling(d: &Arc<Downstream>) -> impl kourier::Handler<Event = Job> {
    let d = d.clone();
    handler_fn(move |m: Message<Job>| {
        let d = d.clone();
        async move { d.call(m.event()).await }
    })
}

/// An open breaker does not delay shutdown: records waiting for it are given up at once
/// (listed in the report, delivered again), and after a restart with the downstream back
/// every record is handled exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_breaker_does_not_delay_shutdown_and_a_restart_handles_everything_once() {
    const RECORDS: usize = 500;
    let (topic, group, dlt_topic) = setup("breaker-stop", 4).await;
    support::produce(&topic, (0..RECORDS).map(|id| job(id, false)).collect()).await;
    let downstream = Downstream::new(RECORDS, true);
    downstream.down.store(true, Ordering::SeqCst);

    // No probe within the test (open for a minute): once open, nothing starts or ends, so
    // the records in flight are exactly those the shutdown gives up.
    let no_probe = BreakerPolicy::default()
        .with_open_interval(Duration::from_secs(60), Duration::from_secs(60));
    let c = Running::start(patient(calling(&downstream), &topic, &group).breaker(no_probe));
    within(
        "records waiting for the open breaker",
        Duration::from_secs(60),
        || {
            c.monitor
                .snapshot()
                .breaker
                .is_some_and(|b| b.state == BreakerState::Open && b.waiting > 0)
        },
    )
    .await;
    let at_stop = c.monitor.snapshot();
    let waiting = at_stop.breaker.map_or(0, |b| b.waiting);
    let in_flight = at_stop.in_flight;
    let stopping = Instant::now();
    // Well under the 60 s shutdown timeout: the waits were cancelled, not waited out.
    let report = c.stop_with_report(Duration::from_secs(20)).await;
    let took = stopping.elapsed();
    eprintln!(
        "shutdown figures: {waiting} records waiting for the breaker, {in_flight} in flight; shutdown took {:.2} s \
         (shutdown_timeout 60 s); {} abandoned",
        took.as_secs_f64(),
        report.abandoned
    );
    assert_eq!(report.abandoned, in_flight, "{report:?}");
    assert_eq!(report.abandoned_records.len(), in_flight.min(100), "listed");
    assert_eq!(downstream.handled(), 0);

    // Restart with the downstream back: nothing lost, nothing twice, nothing dead-lettered.
    downstream.down.store(false, Ordering::SeqCst);
    let c = Running::start(patient(calling(&downstream), &topic, &group));
    within(
        "every record handled after the restart",
        Duration::from_secs(60),
        || downstream.handled() == RECORDS,
    )
    .await;
    let end = c.monitor.snapshot();
    c.stop().await;
    assert_eq!(downstream.not_exactly_once(|_| true), []);
    assert_eq!(end.dead_lettered.total(), 0);
    assert!(support::read_all(&dlt_topic).await.is_empty());
}

/// A rebalance while the breaker is open: the revoked partitions' waiting records are given
/// up at once (the revoke does not wait out its 60 s timeout for a downstream that is down),
/// the new owner takes over, and after recovery every record is handled exactly once with
/// nothing dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_while_the_breaker_is_open_hands_over_promptly_and_loses_nothing() {
    const RECORDS: usize = 2_000;
    const PARTITIONS: i32 = 4;
    let (topic, group, dlt_topic) = setup("breaker-rebalance", PARTITIONS).await;
    support::produce(&topic, (0..RECORDS).map(|id| job(id, false)).collect()).await;
    let downstream = Downstream::new(RECORDS, false);
    downstream.down.store(true, Ordering::SeqCst);

    let a = Running::start(patient(calling(&downstream), &topic, &group));
    within(
        "a's breaker open with records waiting",
        Duration::from_secs(60),
        || {
            let s = a.monitor.snapshot();
            s.assigned.len() == PARTITIONS as usize
                && s.breaker
                    .is_some_and(|b| b.state != BreakerState::Closed && b.waiting > 0)
        },
    )
    .await;
    let in_flight_before = a.monitor.snapshot().in_flight as u64;
    let joining = Instant::now();
    let b = Running::start(patient(calling(&downstream), &topic, &group));
    // Well under the 60 s revoke timeout: a's revoke gave its waiting records up at once.
    within("the hand-over to b", Duration::from_secs(30), || {
        let (sa, sb) = (a.monitor.snapshot(), b.monitor.snapshot());
        !sb.assigned.is_empty() && sa.assigned.len() + sb.assigned.len() == PARTITIONS as usize
    })
    .await;
    let handover = joining.elapsed();
    downstream.down.store(false, Ordering::SeqCst);
    within(
        "every record handled after recovery",
        Duration::from_secs(90),
        || downstream.handled() == RECORDS,
    )
    .await;
    let (sa, sb) = (a.monitor.snapshot(), b.monitor.snapshot());
    eprintln!(
        "rebalance figures: hand-over took {:.2} s (revoke_timeout 60 s); a abandoned {}, \
         b abandoned {}; downstream calls while down {}",
        handover.as_secs_f64(),
        sa.abandoned,
        sb.abandoned,
        downstream.calls_while_down.load(Ordering::SeqCst)
    );
    b.stop().await;
    a.stop().await;
    // How many of a's waiting records the revoke gives up depends on which partitions the
    // group protocol moves: at least one, at most what a held.
    assert!(
        (1..=in_flight_before).contains(&sa.abandoned),
        "a gave up its waiting records at the revoke: {} of {in_flight_before}",
        sa.abandoned
    );
    assert_eq!(downstream.not_exactly_once(|_| true), []);
    assert_eq!(sa.dead_lettered.total() + sb.dead_lettered.total(), 0);
    assert!(support::read_all(&dlt_topic).await.is_empty());
}
