//! The consumer child process (`fault_injection consume ...`): a [`RetryingConsumer`] whose
//! handler fails as each event's [`Fate`] says and appends each side effect to its ledger,
//! printing its monitor's state as JSON lines for the runner.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kourier::dead_letter::Provenance;
use kourier::tiers::{RedisKeyOrderLedger, RetryTiers};
use kourier::{
    BreakerPolicy, CommitMetadata, DedupKey, Handler, HandlerError, Idempotency, Message,
    ProcessingOrder, RedisIdempotencyStore, RetryPolicy, RetryingConsumer, async_trait,
};

use crate::cli::ConsumeArgs;
use crate::event::{Event, Fate};
use crate::ledger::{self, Ledger};
use crate::outcomes::OutcomeLog;
use crate::{
    COMMIT_INTERVAL, COMPOSE_ATTEMPTS_PER_STAGE, LEASE, MAX_ATTEMPTS, SESSION_TIMEOUT, TIER_DELAYS,
};

/// The tier a record of `topic` is in: 0 for the source topic `source`, `n` for its
/// `<source>.retry.<n>`.
fn tier_of(source: &str, topic: &str) -> u32 {
    topic
        .strip_prefix(source)
        .and_then(|rest| rest.strip_prefix(".retry."))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

struct FaultHandler {
    ledger: Ledger,
    seed: u64,
    /// `--compose`: the injected fates of compose runs.
    compose: bool,
    /// The source topic (a record of another topic is in a retry tier).
    topic: String,
    pid: u32,
    /// Half the simulated work, done before and again after the side effect.
    half_work: Duration,
    /// A downstream outage is on: every call that reaches the downstream fails transiently.
    outage: Arc<AtomicBool>,
}

#[async_trait]
impl Handler for FaultHandler {
    type Event = Event;

    async fn handle(&self, m: &Message<Event>) -> Result<(), HandlerError> {
        let ev = m.event();
        // The attempt over every stage: a tier record carries the attempts made before its
        // tier (summed over the tiers, in the provenance headers); `Message::attempt`
        // counts from 1 in each tier.
        let tier = tier_of(&self.topic, m.topic());
        let attempt = if tier > 0 {
            Provenance::from_headers(m.headers())
                .attempts
                .unwrap_or(0)
                .saturating_add(m.attempt())
        } else {
            m.attempt()
        };
        match Fate::of(ev.id, self.seed, self.compose) {
            Fate::Permanent => {
                return Err(HandlerError::permanent(format!(
                    "event {} is injected as permanently failing",
                    ev.id
                )));
            }
            Fate::Exhausted => {
                return Err(HandlerError::transient(format!(
                    "event {} is injected as always failing (attempt {attempt})",
                    ev.id,
                )));
            }
            Fate::Transient(n) if attempt <= n => {
                return Err(HandlerError::transient(format!(
                    "event {} injected failure {attempt} of {n}",
                    ev.id,
                )));
            }
            Fate::Transient(_) | Fate::Ok => {}
        }
        if self.outage.load(Ordering::Relaxed) {
            // Noted in the ledger (on disk before the failure is returned), so the runner knows
            // which attempts the outage failed and which records it dead-lettered.
            self.ledger
                .append(ledger::outage_line(ev.id, attempt))
                .await
                .map_err(|e| HandlerError::transient(format!("ledger write failed: {e}")))?;
            return Err(HandlerError::transient(format!(
                "event {}: downstream outage (attempt {attempt})",
                ev.id,
            )));
        }
        tokio::time::sleep(self.half_work).await;
        let line = ledger::line(ev, attempt, self.pid, m.partition(), m.offset(), tier);
        self.ledger
            .append(line)
            .await
            .map_err(|e| HandlerError::transient(format!("ledger write failed: {e}")))?;
        tokio::time::sleep(self.half_work).await;
        Ok(())
    }
}

pub(crate) fn consume(args: ConsumeArgs) -> i32 {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("consume: cannot start the runtime: {e}");
            return 2;
        }
    };
    match runtime.block_on(consume_async(args)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("consume: {e}");
            1
        }
    }
}

async fn consume_async(args: ConsumeArgs) -> Result<(), Box<dyn std::error::Error>> {
    use tokio::signal::unix::{SignalKind, signal};
    // Catch SIGTERM/SIGINT from the start (a signal before `run` polls its shutdown future is
    // kept, not fatal); the first status line tells the runner they are caught.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let outage = Arc::new(AtomicBool::new(false));
    if let Some(flag) = args.outage_flag.clone() {
        // The runner starts and ends an outage by creating and removing the flag file.
        let outage = outage.clone();
        tokio::spawn(async move {
            loop {
                outage.store(flag.exists(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
    }
    let handler = FaultHandler {
        ledger: Ledger::open(&args.ledger)?,
        seed: args.seed,
        compose: args.compose,
        topic: args.topic.clone(),
        pid: std::process::id(),
        half_work: Duration::from_millis(args.work_ms) / 2,
        outage,
    };
    if let Some(fetch_size) = args.queue_fetch_size {
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        };
        return consume_queue(&args, handler, fetch_size, shutdown).await;
    }
    let mut builder = RetryingConsumer::builder(handler)
        .bootstrap_servers(&args.bootstrap)
        .group_id(&args.group)
        .topic(&args.topic)
        .ordering(ProcessingOrder::Key)
        .max_in_flight(args.max_in_flight)
        .retry_policy(RetryPolicy::fixed(
            Duration::from_millis(50),
            if args.compose {
                COMPOSE_ATTEMPTS_PER_STAGE
            } else {
                MAX_ATTEMPTS
            } - 1,
        ))
        .commit_interval(COMMIT_INTERVAL)
        .shutdown_timeout(Duration::from_secs(20))
        .kafka_config(
            "session.timeout.ms",
            SESSION_TIMEOUT.as_millis().to_string(),
        )
        .kafka_config("heartbeat.interval.ms", "500");
    if let Some(idempotency) = idempotency(&args).await? {
        builder = builder.idempotency(idempotency);
    }
    if args.compose {
        // The key-order ledger, shared by every consumer process of the run.
        let url = args
            .ledger_url
            .as_deref()
            .ok_or("--compose needs --ledger-url")?;
        let ledger = RedisKeyOrderLedger::connect(url)
            .await?
            .key_prefix("fault-order:");
        builder =
            builder.retry_tiers(RetryTiers::new(TIER_DELAYS).with_key_order(Arc::new(ledger)));
    }
    // Every outcome, noted at once: the runner kills the consumer right after a dead letter.
    let outcomes = OutcomeLog::open(&args.outcomes)?;
    let source = args.topic.clone();
    builder = builder.on_outcome(move |record, outcome| {
        outcomes.note(record, outcome, tier_of(&source, &record.topic));
    });
    if args.no_commit_metadata {
        builder = builder.commit_metadata(CommitMetadata::None);
    }
    if args.breaker {
        // Four failed probes in a row by records that failed in the outage already (probes
        // 1, 2, 4 and 8 s apart) close it: more than a 3 s outage can fail, and within the
        // runner's deadline when a broker restart opened it and only records injected to
        // fail are left (with the default ten, 75 s of probing).
        builder = builder.breaker(
            BreakerPolicy::default()
                .with_open_interval(Duration::from_secs(1), Duration::from_secs(10))
                .with_probes_per_record(4),
        );
    }
    let consumer = builder.build()?;
    let monitor = consumer.monitor();
    // A status line every 500 ms; the runner stops the last consumer only once it is idle.
    let status_monitor = monitor.clone();
    let status = tokio::spawn(async move {
        loop {
            println!(
                "{}",
                serde_json::json!({ "status": snapshot_json(&status_monitor) })
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        // The state the consumer was in when told to stop: the runner stops the last one only
        // once everything is handled and committed, so this must be idle and unpaused.
        println!(
            "{}",
            serde_json::json!({ "snapshot": snapshot_json(&monitor) })
        );
    };
    let result = consumer.run(shutdown).await;
    status.abort();
    let report = result?;
    println!(
        "{}",
        serde_json::json!({ "exited": "clean", "abandoned": report.abandoned })
    );
    Ok(())
}

/// The Redis idempotency store at `--redis-url` (none without it), keyed by the event id.
async fn idempotency(
    args: &ConsumeArgs,
) -> Result<Option<Idempotency<Event>>, Box<dyn std::error::Error>> {
    let Some(url) = &args.redis_url else {
        return Ok(None);
    };
    let store = RedisIdempotencyStore::builder(url.as_str())
        .key_prefix("fault:")
        .build()
        .await?;
    let key = DedupKey::from_fn(|m: &Message<Event>| Some(m.event().id.to_string()));
    Ok(Some(
        Idempotency::new(Arc::new(store), key).with_lease(LEASE),
    ))
}

/// Queue mode (`--queue-fetch-size`): the same handler, idempotency store, retry policy and
/// outcome notes over the share group `--group`, with the dead-letter topic `<topic>.dlt`.
/// Its status lines carry no monitor (a `QueueConsumer` has none): the runner reads the
/// outcome logs and the share group's offsets instead.
#[cfg(feature = "queue")]
async fn consume_queue(
    args: &ConsumeArgs,
    handler: FaultHandler,
    fetch_size: usize,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut builder = kourier::queue::QueueConsumer::builder(handler)
        .bootstrap_servers(&args.bootstrap)
        .group_id(&args.group)
        .topic(&args.topic)
        .max_in_flight(args.max_in_flight)
        .fetch_size(fetch_size)
        .retry_policy(RetryPolicy::fixed(
            Duration::from_millis(50),
            MAX_ATTEMPTS - 1,
        ))
        .shutdown_timeout(Duration::from_secs(20));
    if let Some(idempotency) = idempotency(args).await? {
        builder = builder.idempotency(idempotency);
    }
    let outcomes = OutcomeLog::open(&args.outcomes)?;
    builder = builder.on_outcome(move |record, outcome| outcomes.note(record, outcome, 0));
    let consumer = builder.build()?;
    // A status line every 500 ms (the runner waits for the first before it signals).
    let status = tokio::spawn(async move {
        loop {
            println!(
                "{}",
                serde_json::json!({ "status": { "queue": true, "pid": std::process::id() } })
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let result = consumer.run(shutdown).await;
    status.abort();
    let report = result?;
    println!(
        "{}",
        serde_json::json!({
            "exited": "clean",
            "abandoned": report.abandoned,
            "released_unstarted": report.released_unstarted,
            "acknowledgement_failures": report.acknowledgement_failures,
        })
    );
    Ok(())
}

/// Without the `queue` feature the runner refuses `--queue` before it starts a consumer.
#[cfg(not(feature = "queue"))]
async fn consume_queue(
    _args: &ConsumeArgs,
    _handler: FaultHandler,
    _fetch_size: usize,
    _shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), Box<dyn std::error::Error>> {
    Err(crate::queue_run::NO_FEATURE.into())
}

fn snapshot_json(monitor: &kourier::ConsumerMonitor) -> serde_json::Value {
    let s = monitor.snapshot();
    let breaker = s.breaker.as_ref().map(|b| {
        serde_json::json!({
            "state": b.state.as_str(),
            "opened": b.opened,
            "probes": b.probes,
            "held_failures": b.held_failures,
        })
    });
    // Partitions whose lag is not known to be 0: why the snapshot is not caught up.
    let lagging: Vec<serde_json::Value> = s
        .partitions
        .iter()
        .filter(|p| p.lag != Some(0))
        .map(|p| serde_json::json!([p.topic, p.partition, p.committed, p.end_offset, p.lag]))
        .collect();
    serde_json::json!({
        "in_flight": s.in_flight,
        "lagging": lagging,
        "buffered_records": s.buffered_records,
        "buffered_bytes": s.buffered_bytes,
        "assigned": s.assigned,
        "paused": s.paused,
        "caught_up": s.caught_up,
        "forwarded": s.forwarded,
        "skipped_finished": s.skipped_finished,
        "breaker": breaker,
    })
}
