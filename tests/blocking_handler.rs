//! A handler that blocks its thread, run the supported way (`kourier::blocking`), against the
//! real broker: while some records block for seconds, records of other keys keep flowing and
//! the application's own tasks on the runtime keep running (issue 14: a blocking handler used
//! to freeze them for up to 7.8 s).

mod support;

use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kourier::{BlockingHandler, HandlerError, Message, ProcessingOrder, blocking};
use support::TestRecord;
use support::consumer::{Running, builder, setup, wait_for};

const BLOCK: Duration = Duration::from_secs(4);

/// Blocks its thread for [`BLOCK`] on records keyed `slow`; the others are quick.
#[derive(Default)]
struct SyncWork {
    slow_done: AtomicU64,
    fast_done: Mutex<Vec<(String, Instant)>>,
}

/// The handler: shares its counters with the test.
struct Handler(Arc<SyncWork>);

impl BlockingHandler for Handler {
    type Event = serde_json::Value;

    fn handle(&self, message: &Message<serde_json::Value>) -> Result<(), HandlerError> {
        if message.key() == Some(b"slow".as_slice()) {
            std::thread::sleep(BLOCK); // a synchronous client, say
            self.0.slow_done.fetch_add(1, AtomicOrdering::SeqCst);
        } else {
            let key = message.key_str().unwrap_or_default().to_owned();
            self.0.fast_done.lock().unwrap().push((key, Instant::now()));
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_handler_leaves_other_records_and_tasks_running() {
    support::require_kafka().await;
    let (topic, group, _dlt) = setup("blocking", 1).await;
    // Two slow records first (they block two blocking-pool threads), then 40 quick ones.
    let mut records = vec![
        TestRecord::new().key("slow").value("{}"),
        TestRecord::new().key("slow").value("{}"),
    ];
    records.extend((0..40).map(|i| TestRecord::new().key(format!("k{i}")).value("{}")));
    support::produce(&topic, records).await;

    // The application's own task: how long does it ever wait for its 20 ms tick?
    let longest_gap = Arc::new(Mutex::new(Duration::ZERO));
    let gap = longest_gap.clone();
    let ticker = tokio::spawn(async move {
        let mut last = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now = Instant::now();
            let mut g = gap.lock().unwrap();
            *g = (*g).max(now - last);
            last = now;
        }
    });

    let work = Arc::new(SyncWork::default());
    let started = Instant::now();
    let c = Running::start(
        builder(blocking(Handler(work.clone())), &topic, &group)
            .ordering(ProcessingOrder::Key)
            .max_in_flight(8),
    );
    wait_for("the 40 quick records", Duration::from_secs(60), || {
        work.fast_done.lock().unwrap().len() == 40
    })
    .await;
    let quick_done = started.elapsed();
    let slow_done_then = work.slow_done.load(AtomicOrdering::SeqCst);
    wait_for("the slow records", Duration::from_secs(60), || {
        work.slow_done.load(AtomicOrdering::SeqCst) == 2
    })
    .await;
    c.stop().await;
    ticker.abort();
    let gap = *longest_gap.lock().unwrap();
    eprintln!(
        "blocking handler: 40 quick records done after {quick_done:?} while {slow_done_then} of 2 \
         slow ones ({BLOCK:?} each) had finished; longest tick gap of the app's task {gap:?}"
    );
    assert!(
        slow_done_then < 2,
        "the quick records flowed while the slow ones still blocked"
    );
    assert!(
        gap < BLOCK / 2,
        "the application's task waited {gap:?}: the runtime was blocked"
    );
}
