//! Breakers per destination (delivery rule 19 in the crate docs) against the real broker:
//! destinations that are down hold only their own records; a downstream down as a whole
//! still opens the consumer-wide breaker.
//!
//! The handler delivers to simulated endpoints (one per key) that the test takes down and
//! brings back. Each test prints its figures for the report; the assertions are about
//! outcomes (dead letters, deliveries per record, calls to endpoints that are down against
//! the probes the open interval allows), never about timing.
//!
//! Needs Kafka (`scripts/services up`); each test has its own topics and group.

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kourier::tiers::RetryTiers;
use kourier::{
    BreakerPolicy, BreakerState, DedupKey, Destinations, HandlerError, Idempotency,
    InMemoryIdempotencyStore, Message, MissingTopics, ProcessingOrder, RetryPolicy, handler_fn,
};
use serde::Deserialize;
use support::TestRecord;
use support::consumer::{self, Running, setup, wait_for};

#[derive(Debug, Deserialize)]
struct Delivery {
    id: usize,
}

/// Endpoints `ep-0` .. `ep-{ENDPOINTS - 1}`; record `id` goes to `ep-{id % ENDPOINTS}`.
const ENDPOINTS: usize = 100;

fn delivery(id: usize) -> TestRecord {
    TestRecord::new()
        .key(format!("ep-{}", id % ENDPOINTS))
        .value(format!(r#"{{"id":{id}}}"#))
}

/// The endpoints, which of them are down, and what the handler saw.
struct Endpoints {
    down: Mutex<HashSet<usize>>,
    /// Every endpoint is down (a downstream outage as a whole).
    all_down: AtomicBool,
    successes: Vec<AtomicU32>,
    calls_while_down: AtomicU64,
    /// Every successful delivery's id, in order.
    delivered: Mutex<Vec<usize>>,
}

impl Endpoints {
    fn new(records: usize) -> Arc<Self> {
        Arc::new(Endpoints {
            down: Mutex::new(HashSet::new()),
            all_down: AtomicBool::new(false),
            successes: (0..records).map(|_| AtomicU32::new(0)).collect(),
            calls_while_down: AtomicU64::new(0),
            delivered: Mutex::new(Vec::new()),
        })
    }

    fn deliver(&self, d: &Delivery) -> Result<(), HandlerError> {
        let endpoint = d.id % ENDPOINTS;
        if self.all_down.load(Ordering::SeqCst) || self.down.lock().unwrap().contains(&endpoint) {
            self.calls_while_down.fetch_add(1, Ordering::SeqCst);
            // Connection refused: the handler's word that this endpoint is down.
            return Err(HandlerError::unavailable(format!(
                "ep-{endpoint}: connection refused"
            )));
        }
        self.successes[d.id].fetch_add(1, Ordering::SeqCst);
        self.delivered.lock().unwrap().push(d.id);
        Ok(())
    }

    fn handled(&self, which: impl Fn(usize) -> bool) -> usize {
        (self.successes.iter().enumerate())
            .filter(|(id, n)| which(*id) && n.load(Ordering::SeqCst) > 0)
            .count()
    }

    fn not_exactly_once(&self) -> Vec<(usize, u32)> {
        (self.successes.iter().enumerate())
            .map(|(id, n)| (id, n.load(Ordering::SeqCst)))
            .filter(|(_, n)| *n != 1)
            .collect()
    }
}

fn delivering(e: &Arc<Endpoints>) -> impl kourier::Handler<Event = Delivery> {
    let e = e.clone();
    handler_fn(move |m: Message<Delivery>| {
        let e = e.clone();
        async move { e.deliver(m.event()) }
    })
}

const OPEN: Duration = Duration::from_millis(500);

/// Waits until every record was delivered, stops `c`, and checks each was delivered exactly
/// once and nothing was dead-lettered.
async fn every_record_delivered_once(c: Running, endpoints: &Endpoints, dlt_topic: &str) {
    let all = endpoints.successes.len();
    wait_for("every record delivered", Duration::from_secs(60), || {
        endpoints.handled(|_| true) == all
    })
    .await;
    let end = c.monitor.snapshot();
    c.stop().await;
    assert_eq!(endpoints.not_exactly_once(), []);
    assert_eq!(end.dead_lettered.total(), 0);
    assert!(support::read_all(dlt_topic).await.is_empty());
}

/// Key order, a breaker per destination (the key) open 0.5 s, and the consumer-wide
/// breaker with its defaults (at least 3 destinations).
fn isolating(
    e: &Arc<Endpoints>,
    topic: &str,
    group: &str,
) -> kourier::RetryingConsumerBuilder<impl kourier::Handler<Event = Delivery>> {
    consumer::builder(delivering(e), topic, group)
        .ordering(ProcessingOrder::Key)
        .retry_policy(RetryPolicy::fixed(Duration::from_millis(50), 3))
        .destinations(Destinations::by_key().with_open_interval(OPEN, OPEN))
        .breaker(BreakerPolicy::default().with_open_interval(OPEN, OPEN))
}

/// Two endpoints of 100 down: every other endpoint's record is delivered while they are
/// down, nothing is dead-lettered, the consumer-wide breaker stays closed, the endpoints
/// that are down are called about once per open interval, and once they are back each of
/// their records is delivered exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_that_are_down_hold_only_their_own_deliveries() {
    const RECORDS: usize = 3_000;
    let (topic, group, dlt_topic) = setup("destinations-two-down", 4).await;
    let endpoints = Endpoints::new(RECORDS);
    endpoints.down.lock().unwrap().extend([0, 1]);
    support::produce(&topic, (0..RECORDS).map(delivery).collect()).await;
    let down_records = |id: usize| id % ENDPOINTS < 2;

    let started = Instant::now();
    let c = Running::start(isolating(&endpoints, &topic, &group));
    wait_for(
        "every record of the healthy endpoints delivered",
        Duration::from_secs(60),
        || endpoints.handled(|id| !down_records(id)) == RECORDS - RECORDS / 50,
    )
    .await;
    let healthy_done = started.elapsed();
    // Let the open endpoints be probed a few intervals more.
    tokio::time::sleep(OPEN * 4).await;
    let while_down = c.monitor.snapshot();
    let down_elapsed = started.elapsed();
    let calls_while_down = endpoints.calls_while_down.load(Ordering::SeqCst);
    let d = while_down
        .destinations
        .clone()
        .expect("destinations in the snapshot");
    eprintln!(
        "two of {ENDPOINTS} endpoints down: the other {} records delivered in {:.2} s; \
         {calls_while_down} calls to the down endpoints in {:.2} s (open interval {OPEN:?}); {d:?}",
        RECORDS - RECORDS / 50,
        healthy_done.as_secs_f64(),
        down_elapsed.as_secs_f64()
    );
    assert_eq!(endpoints.handled(down_records), 0);
    assert_eq!(while_down.dead_lettered.total(), 0, "nothing dead-lettered");
    assert_eq!(d.open, 2, "{d:?}");
    let mut names: Vec<&str> = d.top.iter().map(|t| t.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["ep-0", "ep-1"]);
    assert!(
        while_down
            .breaker
            .as_ref()
            .is_some_and(|b| b.state == BreakerState::Closed && b.opened == 0),
        "two endpoints do not open the consumer-wide breaker: {:?}",
        while_down.breaker
    );
    // One call opens each; then one probe per open interval at most (plus one for an
    // interval that ended as the count was read).
    let allowed = 2 * (1 + down_elapsed.as_millis() / OPEN.as_millis() + 1) as u64;
    assert!(
        calls_while_down <= allowed,
        "{calls_while_down} calls to the down endpoints, at most {allowed} allowed"
    );

    endpoints.down.lock().unwrap().clear();
    wait_for(
        "the endpoints' records delivered once they are back",
        Duration::from_secs(60),
        || endpoints.handled(|_| true) == RECORDS,
    )
    .await;
    wait_for("their breakers closed", Duration::from_secs(10), || {
        c.monitor
            .snapshot()
            .destinations
            .is_some_and(|d| d.open == 0)
    })
    .await;
    every_record_delivered_once(c, &endpoints, &dlt_topic).await;
}

/// Every endpoint down: the failures span many destinations, so the consumer-wide breaker
/// opens (dispatch held) and nothing is dead-lettered; once the downstream is back every
/// record is delivered exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downstream_down_as_a_whole_still_opens_the_consumer_breaker() {
    const RECORDS: usize = 1_000;
    let (topic, group, dlt_topic) = setup("destinations-all-down", 4).await;
    let endpoints = Endpoints::new(RECORDS);
    endpoints.all_down.store(true, Ordering::SeqCst);
    support::produce(&topic, (0..RECORDS).map(delivery).collect()).await;

    let c = Running::start(isolating(&endpoints, &topic, &group));
    wait_for(
        "the consumer-wide breaker open",
        Duration::from_secs(60),
        || {
            c.monitor
                .snapshot()
                .breaker
                .is_some_and(|b| b.state != BreakerState::Closed)
        },
    )
    .await;
    let open = c.monitor.snapshot();
    eprintln!(
        "downstream down: consumer-wide breaker {:?}; destinations {:?}; {} calls",
        open.breaker.as_ref().map(|b| b.state),
        open.destinations.as_ref().map(|d| (d.tracked, d.open)),
        endpoints.calls_while_down.load(Ordering::SeqCst)
    );
    assert_eq!(open.dead_lettered.total(), 0);

    endpoints.all_down.store(false, Ordering::SeqCst);
    every_record_delivered_once(c, &endpoints, &dlt_topic).await;
}

/// Records waiting for their destination do not hold a shutdown: they are given up at once
/// (delivered again), and a restart with the endpoints back delivers each record exactly
/// once (the records above them in their partitions, delivered again too, are skipped by
/// the idempotency store).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_waiting_for_their_destination_do_not_hold_a_shutdown() {
    const RECORDS: usize = 500;
    let (topic, group, dlt_topic) = setup("destinations-stop", 4).await;
    let endpoints = Endpoints::new(RECORDS);
    endpoints.down.lock().unwrap().extend([0, 1, 2]);
    support::produce(&topic, (0..RECORDS).map(delivery).collect()).await;

    let store = Arc::new(InMemoryIdempotencyStore::new());
    let idempotency = || {
        let key = DedupKey::from_fn(|m: &Message<Delivery>| Some(m.event().id.to_string()));
        Idempotency::new(store.clone(), key)
    };
    // No probe within the test; the consumer-wide breaker needs more destinations.
    let c = Running::start(
        isolating(&endpoints, &topic, &group)
            .idempotency(idempotency())
            .destinations(
                Destinations::by_key()
                    .with_open_interval(Duration::from_secs(120), Duration::from_secs(120)),
            )
            .breaker(BreakerPolicy::default().with_min_destinations(10))
            .shutdown_timeout(Duration::from_secs(60)),
    );
    wait_for(
        "the healthy endpoints' records",
        Duration::from_secs(60),
        || endpoints.handled(|_| true) == RECORDS - 3 * RECORDS / ENDPOINTS,
    )
    .await;
    wait_for("three records waiting", Duration::from_secs(10), || {
        c.monitor.snapshot().waiting_retry == 3
    })
    .await;
    let stopping = Instant::now();
    // Well under the 60 s shutdown timeout: the waits were cancelled, not waited out.
    let report = c.stop_with_report(Duration::from_secs(20)).await;
    eprintln!(
        "shutdown with 3 destinations open took {:.2} s; {} abandoned",
        stopping.elapsed().as_secs_f64(),
        report.abandoned
    );
    assert_eq!(report.abandoned, 3, "{report:?}");

    endpoints.down.lock().unwrap().clear();
    let c = Running::start(isolating(&endpoints, &topic, &group).idempotency(idempotency()));
    every_record_delivered_once(c, &endpoints, &dlt_topic).await;
}

/// An endpoint that answers `410 Gone`: its first record is dead-lettered with the handler's
/// words, and so are its later records, without calling it again; other endpoints are not
/// touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gone_endpoint_dead_letters_its_records_without_calling_it_again() {
    const RECORDS: usize = 1_000;
    let (topic, group, dlt_topic) = setup("destinations-gone", 4).await;
    support::produce(&topic, (0..RECORDS).map(delivery).collect()).await;
    let calls_to_gone = Arc::new(AtomicU64::new(0));
    let delivered = Arc::new(AtomicU64::new(0));
    let (calls, ok) = (calls_to_gone.clone(), delivered.clone());
    let handler = handler_fn(move |m: Message<Delivery>| {
        let (calls, ok) = (calls.clone(), ok.clone());
        async move {
            if m.event().id % ENDPOINTS == 7 {
                calls.fetch_add(1, Ordering::SeqCst);
                return Err(HandlerError::destination_gone("ep-7: 410 Gone"));
            }
            ok.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    });
    let c = Running::start(
        consumer::builder(handler, &topic, &group)
            .ordering(ProcessingOrder::Key)
            .destinations(Destinations::by_key()),
    );
    let gone_records = (RECORDS / ENDPOINTS) as u64;
    wait_for("every record settled", Duration::from_secs(60), || {
        let s = c.monitor.snapshot();
        delivered.load(Ordering::SeqCst) == RECORDS as u64 - gone_records
            && s.dead_lettered.total() == gone_records
    })
    .await;
    let end = c.monitor.snapshot();
    c.stop().await;
    assert_eq!(
        calls_to_gone.load(Ordering::SeqCst),
        1,
        "called once, then never again"
    );
    assert_eq!(end.dead_lettered.permanent, gone_records);
    let d = end.destinations.expect("destinations");
    assert_eq!(d.top[0].gone.as_deref(), Some("ep-7: 410 Gone"), "{d:?}");
    let letters = support::read_all(&dlt_topic).await;
    assert_eq!(letters.len(), gone_records as usize);
    let messages: Vec<&str> = (letters.iter())
        .map(|l| l.header_str(kourier::dead_letter::headers::EXCEPTION_MESSAGE))
        .collect();
    assert_eq!(
        messages[0], "ep-7: 410 Gone",
        "the record that got the answer"
    );
    assert!(
        messages[1..]
            .iter()
            .all(|m| *m == "destination gone: ep-7: 410 Gone"),
        "{messages:?}"
    );
}

/// A per-destination cap in unordered mode: one hot endpoint never has more attempts
/// running than its cap, while the other endpoints' records run alongside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cap_holds_a_hot_endpoint_to_its_share() {
    const RECORDS: usize = 400;
    const CAP: u64 = 3;
    let (topic, group, _dlt) = setup("destinations-cap", 4).await;
    // Half the records go to the hot endpoint, the rest spread over 100.
    let records = (0..RECORDS)
        .map(|id| {
            let endpoint = if id % 2 == 0 {
                "hot".to_owned()
            } else {
                format!("ep-{id}")
            };
            TestRecord::new()
                .key(endpoint)
                .value(format!(r#"{{"id":{id}}}"#))
        })
        .collect();
    support::produce(&topic, records).await;
    let running = Arc::new(AtomicU64::new(0));
    let most = Arc::new(AtomicU64::new(0));
    let others_running_with_hot = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let (r, m, o, d) = (
        running.clone(),
        most.clone(),
        others_running_with_hot.clone(),
        done.clone(),
    );
    let handler = handler_fn(move |msg: Message<Delivery>| {
        let (r, m, o, d) = (r.clone(), m.clone(), o.clone(), d.clone());
        async move {
            if msg.key_str() == Some("hot") {
                let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                r.fetch_sub(1, Ordering::SeqCst);
            } else if r.load(Ordering::SeqCst) > 0 {
                o.fetch_add(1, Ordering::SeqCst);
            }
            d.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    });
    let c = Running::start(
        consumer::builder(handler, &topic, &group)
            .ordering(ProcessingOrder::Unordered)
            .max_in_flight(32)
            .destinations(Destinations::by_key().with_max_in_flight(CAP as u32)),
    );
    wait_for("every record handled", Duration::from_secs(60), || {
        done.load(Ordering::SeqCst) == RECORDS as u64
    })
    .await;
    c.stop().await;
    let most = most.load(Ordering::SeqCst);
    eprintln!(
        "hot endpoint: at most {most} attempts at once (cap {CAP}); {} other records ran while it had some",
        others_running_with_hot.load(Ordering::SeqCst)
    );
    assert!(
        most <= CAP,
        "{most} attempts at once to the hot endpoint, cap {CAP}"
    );
    assert!(
        most >= 2,
        "the cap, not a lack of records, limited it: {most}"
    );
}

/// One endpoint down on a partition whose uncommitted window is small (100 records, and a
/// buffer of 50): its records are parked in the retry tier after waiting 0.3 s, so the
/// partition's commit point moves on and every other endpoint's record is delivered while it
/// is down (waiting in place, the window fills behind its first record and the partition
/// pauses at twice it: fewer than 250 of the other 990 would be delivered). Nothing is dead-lettered and no attempt is
/// used; once the endpoint is back its records are delivered exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_a_down_endpoint_are_parked_so_its_partition_goes_on() {
    const RECORDS: usize = 1_000;
    let (topic, group, dlt_topic) = setup("destinations-park", 1).await;
    let endpoints = Endpoints::new(RECORDS);
    endpoints.down.lock().unwrap().insert(0);
    support::produce(&topic, (0..RECORDS).map(delivery).collect()).await;
    let down_records = |id: usize| id.is_multiple_of(ENDPOINTS);

    let tiers = RetryTiers::new([Duration::from_secs(1)])
        .with_key_order(Arc::new(kourier::tiers::InMemoryKeyOrderLedger::new()));
    let b = isolating(&endpoints, &topic, &group)
        .destinations(
            Destinations::by_key()
                .with_open_interval(OPEN, OPEN)
                .with_park_after(Duration::from_millis(300)),
        )
        .idempotency(Idempotency::new(
            Arc::new(InMemoryIdempotencyStore::new()),
            DedupKey::from_fn(|m: &Message<Delivery>| Some(m.event().id.to_string())),
        ))
        .retry_tiers(tiers)
        .missing_topics(MissingTopics::create(1))
        .max_buffered_records(50)
        .max_uncommitted_per_partition(100);
    let c = Running::start(b);
    wait_for(
        "every record of the healthy endpoints delivered while ep-0 is down",
        Duration::from_secs(60),
        || endpoints.handled(|id| !down_records(id)) == RECORDS - RECORDS / ENDPOINTS,
    )
    .await;
    let while_down = c.monitor.snapshot();
    let d = while_down.destinations.clone().expect("destinations");
    eprintln!(
        "one endpoint down, window 100: the other {} records delivered; parked {} times; {:?}",
        RECORDS - RECORDS / ENDPOINTS,
        d.parked,
        while_down.forwarded
    );
    assert_eq!(endpoints.handled(down_records), 0);
    assert!(d.parked >= 1, "records were parked: {d:?}");
    assert_eq!(while_down.dead_lettered.total(), 0, "nothing dead-lettered");

    endpoints.down.lock().unwrap().clear();
    wait_for(
        "ep-0's records delivered once it is back",
        Duration::from_secs(60),
        || endpoints.handled(|_| true) == RECORDS,
    )
    .await;
    let order: Vec<usize> = (endpoints.delivered.lock().unwrap().iter().copied())
        .filter(|id| down_records(*id))
        .collect();
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "ep-0's records in order: {order:?}"
    );
    every_record_delivered_once(c, &endpoints, &dlt_topic).await;
}
