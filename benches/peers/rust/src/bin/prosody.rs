//! prosody 0.7.1 on the peers benchmark's job (see `scripts/peers`): its low-latency consumer
//! (retries, then the failure topic `<topic>.dlt`) against the real broker, with in-memory
//! timer and dedup state (no Cassandra), max concurrency 64 and 1,024 uncommitted records.
//! prosody keeps records of one key in order and always runs its own in-memory dedup (on the
//! JSON `id` field); in scenario `redis` the handler does the Redis `SET NX` as Parallel
//! Consumer's does. Prints one JSON result line.

use std::fmt;
use std::sync::Arc;

use kourier_peers::{
    Args, BoxResult, DEDUP_TTL, DeadLetters, Drained, Fate, MAX_IN_FLIGHT, MAX_UNCOMMITTED,
    RETRY_BACKOFF, Scenario, Tracker, WORK, cpu_secs, fate, report, wait_settled,
};
use prosody::JsonCodec;
use prosody::consumer::middleware::deduplication::DeduplicationConfigurationBuilder;
use prosody::consumer::middleware::retry::RetryConfigurationBuilder;
use prosody::consumer::middleware::scheduler::SchedulerConfigurationBuilder;
use prosody::consumer::middleware::timeout::TimeoutConfigurationBuilder;
use prosody::consumer::middleware::topic::FailureTopicConfigurationBuilder;
use prosody::consumer::{
    CommonConfiguration, ConsumerConfiguration, ConsumerSetup, KeyedStateConfiguration,
    LowLatencyMiddlewareConfiguration, ProsodyConsumer,
};
use prosody::high_level::config::TriggerStoreConfiguration;
use prosody::prelude::{
    ClassifyError, ConsumerMessage, DemandType, ErrorCategory, EventContext, FallibleHandler,
    Trigger,
};
use prosody::producer::{ProducerConfiguration, ProsodyProducer};
use prosody::telemetry::Telemetry;
use redis::aio::ConnectionManager;
use serde_json::Value;

#[derive(Debug)]
enum Failure {
    Permanent,
    Transient,
    Redis(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Permanent => f.write_str("peers: permanent failure"),
            Failure::Transient => f.write_str("peers: transient failure"),
            Failure::Redis(e) => write!(f, "peers: redis: {e}"),
        }
    }
}

impl std::error::Error for Failure {}

impl ClassifyError for Failure {
    fn classify_error(&self) -> ErrorCategory {
        match self {
            Failure::Permanent => ErrorCategory::Permanent,
            Failure::Transient | Failure::Redis(_) => ErrorCategory::Transient,
        }
    }
}

#[derive(Clone)]
struct Notifier {
    scenario: Scenario,
    tracker: Arc<Tracker>,
    redis: Option<ConnectionManager>,
    args: Arc<Args>,
}

impl Notifier {
    async fn handle(&self, payload: &Value) -> Result<(), Failure> {
        let Some(seq) = payload.get("seq").and_then(Value::as_u64) else {
            return Err(Failure::Permanent);
        };
        let first_attempt = self.tracker.enter(seq);
        if let Some(redis) = &self.redis {
            let id = payload
                .get("id")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let claimed: Option<String> = redis::cmd("SET")
                .arg(self.args.dedup_key(id))
                .arg("1")
                .arg("NX")
                .arg("EX")
                .arg(DEDUP_TTL.as_secs())
                .query_async(&mut redis.clone())
                .await
                .map_err(|e| Failure::Redis(e.to_string()))?;
            if claimed.is_none() {
                return Ok(()); // a duplicate: handled before
            }
        }
        if self.scenario == Scenario::Work {
            tokio::time::sleep(WORK).await;
        }
        match fate(self.scenario, seq) {
            Fate::Permanent => return Err(Failure::Permanent),
            Fate::TransientOnce if first_attempt => return Err(Failure::Transient),
            _ => {}
        }
        self.tracker.handled(seq);
        Ok(())
    }
}

impl FallibleHandler for Notifier {
    type Payload = Value;
    type Error = Failure;
    type Output = ();

    async fn on_message<C>(
        &self,
        _context: C,
        message: ConsumerMessage<Value>,
        _demand_type: DemandType,
    ) -> Result<(), Failure>
    where
        C: EventContext<Payload = Value>,
    {
        self.handle(message.payload()).await
    }

    async fn on_excise<C>(
        &self,
        _context: C,
        _message: ConsumerMessage<()>,
        _demand_type: DemandType,
    ) -> Result<(), Failure>
    where
        C: EventContext<Payload = Value>,
    {
        Ok(())
    }

    async fn on_timer<C>(
        &self,
        _context: C,
        _trigger: Trigger,
        _demand_type: DemandType,
    ) -> Result<(), Failure>
    where
        C: EventContext<Payload = Value>,
    {
        Ok(())
    }

    async fn shutdown(self) {}
}

#[tokio::main]
async fn main() -> BoxResult<()> {
    run(Args::parse()?).await
}

async fn run(args: Args) -> BoxResult<()> {
    let args = Arc::new(args);
    let tracker = Arc::new(Tracker::new(args.records));
    let dead_letters = DeadLetters::new(&args)?;
    let redis = if args.scenario == Scenario::Redis {
        let client = redis::Client::open(args.redis_url.as_str())?;
        Some(ConnectionManager::new(client).await?)
    } else {
        None
    };
    let cpu0 = cpu_secs();
    let consumer_config = ConsumerConfiguration::builder()
        .bootstrap_servers(vec![args.bootstrap.clone()])
        .group_id(args.group.clone())
        .subscribed_topics(std::slice::from_ref(&args.topic))
        .max_uncommitted(MAX_UNCOMMITTED)
        .probe_port(None)
        .build()?;
    let producer_config = ProducerConfiguration::builder()
        .bootstrap_servers(vec![args.bootstrap.clone()])
        .source_system(format!("{}-producer", args.group))
        .build()?;
    let common = CommonConfiguration {
        scheduler: SchedulerConfigurationBuilder::default()
            .max_concurrency(MAX_IN_FLIGHT)
            .build()?,
        timeout: TimeoutConfigurationBuilder::default().build()?,
        dedup: DeduplicationConfigurationBuilder::default().build()?,
        keyed_state: KeyedStateConfiguration::builder().build()?,
    };
    let low_latency = LowLatencyMiddlewareConfiguration {
        retry: RetryConfigurationBuilder::default()
            .base(RETRY_BACKOFF)
            .max_retries(3_u32)
            .build()?,
        failure_topic: FailureTopicConfigurationBuilder::default()
            .failure_topic(args.dead_letter_topic())
            .build()?,
    };
    let telemetry = Telemetry::new();
    let producer = ProsodyProducer::<JsonCodec>::new(&producer_config, telemetry.sender())?;
    let handler = Notifier {
        scenario: args.scenario,
        tracker: tracker.clone(),
        redis,
        args: args.clone(),
    };
    let consumer = ProsodyConsumer::<JsonCodec>::low_latency_consumer(
        ConsumerSetup {
            consumer: &consumer_config,
            trigger_store: &TriggerStoreConfiguration::InMemory,
            common: &common,
        },
        low_latency,
        producer,
        telemetry,
        handler,
    )
    .await?;
    let end = wait_settled(&tracker, &args, &dead_letters).await?;
    let drained = Drained::now(end, cpu0);
    consumer.shutdown().await;
    report("prosody", &args, &tracker, &dead_letters, drained)
}
