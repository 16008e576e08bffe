//! kourier on the peers benchmark's job (see `scripts/peers`): `ProcessingOrder::Key`,
//! `max_in_flight(64)`, a fixed 500 ms retry, dead letters to `<topic>.dlt` (kourier's default
//! sink), and in scenario `redis` kourier's own `RedisIdempotencyStore` on the `event-id`
//! header. Prints one JSON result line.

use std::sync::Arc;

use kourier::{
    DedupKey, Handler, HandlerError, Idempotency, Message, ProcessingOrder, RedisIdempotencyStore,
    RetryPolicy, RetryingConsumer, async_trait,
};
use kourier_peers::{
    Args, BoxResult, DEDUP_TTL, DeadLetters, Drained, EVENT_ID_HEADER, Fate, MAX_IN_FLIGHT,
    RETRY_BACKOFF, Scenario, Tracker, WORK, cpu_secs, fate, report, wait_settled,
};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Event {
    seq: u64,
}

#[derive(Debug)]
struct Notifier {
    scenario: Scenario,
    tracker: Arc<Tracker>,
}

#[async_trait]
impl Handler for Notifier {
    type Event = Event;

    async fn handle(&self, message: &Message<Event>) -> Result<(), HandlerError> {
        let seq = message.event().seq;
        let first_attempt = self.tracker.enter(seq);
        if self.scenario == Scenario::Work {
            tokio::time::sleep(WORK).await;
        }
        match fate(self.scenario, seq) {
            Fate::Permanent => return Err(HandlerError::permanent("peers: permanent failure")),
            Fate::TransientOnce if first_attempt => {
                return Err(HandlerError::transient("peers: transient failure"));
            }
            _ => {}
        }
        self.tracker.handled(seq);
        Ok(())
    }
}

#[tokio::main]
async fn main() -> BoxResult<()> {
    run(Args::parse()?).await
}

async fn run(args: Args) -> BoxResult<()> {
    let tracker = Arc::new(Tracker::new(args.records));
    let dead_letters = DeadLetters::new(&args)?;
    let cpu0 = cpu_secs();
    let handler = Notifier {
        scenario: args.scenario,
        tracker: tracker.clone(),
    };
    let mut builder = RetryingConsumer::builder(handler)
        .bootstrap_servers(&args.bootstrap)
        .group_id(&args.group)
        .topic(&args.topic)
        .ordering(ProcessingOrder::Key)
        .max_in_flight(MAX_IN_FLIGHT)
        .retry_policy(RetryPolicy::fixed(RETRY_BACKOFF, 3));
    if args.scenario == Scenario::Redis {
        let store = RedisIdempotencyStore::builder(args.redis_url.as_str())
            .key_prefix(args.dedup_prefix())
            .build()
            .await?;
        builder = builder.idempotency(
            Idempotency::new(Arc::new(store), DedupKey::header(EVENT_ID_HEADER))
                .with_ttl(DEDUP_TTL),
        );
    }
    let consumer = builder.build()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(consumer.run(async {
        let _ = stopped.await;
    }));
    let end = wait_settled(&tracker, &args, &dead_letters).await?;
    let drained = Drained::now(end, cpu0);
    let _ = stop.send(());
    // Every record was settled before the stop: nothing can be abandoned.
    let _report = task.await??;
    report("kourier", &args, &tracker, &dead_letters, drained)
}
