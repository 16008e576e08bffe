//! Where the test services are, and failing loudly when they are not there: the Kafka broker,
//! Redis, and `scripts/services` for the fault tests that restart them.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;

#[path = "addresses.rs"]
mod addresses;
pub(crate) use addresses::{bootstrap, client_config, redis_url};

/// How long a helper waits for the broker before failing the test.
pub(crate) const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);

/// What a test that cannot reach a service tells the reader to do.
pub(crate) const START_HINT: &str = "start the test services with `scripts/services up`";

/// Fails the test unless the broker answers a metadata request within 10 s.
pub(crate) async fn require_kafka() {
    require_kafka_at(&bootstrap(), KAFKA_TIMEOUT).await;
}

/// Like [`require_kafka`] for a given address and timeout.
pub(crate) async fn require_kafka_at(bootstrap: &str, timeout: Duration) {
    let servers = bootstrap.to_owned();
    let result = tokio::task::spawn_blocking(move || -> Result<usize, KafkaError> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &servers)
            .create()?;
        let brokers = consumer.fetch_metadata(None, timeout)?.brokers().len();
        Ok(brokers)
    })
    .await
    .expect("metadata probe panicked");
    match result {
        Ok(brokers) if brokers > 0 => {}
        Ok(_) => panic!("Kafka at {bootstrap} answered with no brokers; {START_HINT}"),
        Err(e) => panic!(
            "Kafka is not reachable at {bootstrap} ({e}); {START_HINT} \
             (or set KAFKA_BOOTSTRAP_SERVERS to a running broker)"
        ),
    }
}

/// Fails the test unless Redis answers PING within 10 s.
pub(crate) async fn require_redis() {
    require_redis_at(&redis_url(), KAFKA_TIMEOUT).await;
}

/// Like [`require_redis`] for a given URL and timeout.
pub(crate) async fn require_redis_at(url: &str, timeout: Duration) {
    let ping = async {
        let client = redis::Client::open(url)?;
        let mut connection = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
    };
    match tokio::time::timeout(timeout, ping).await {
        Ok(Ok(pong)) if pong == "PONG" => {}
        Ok(Ok(other)) => panic!("Redis at {url} answered PING with {other:?}; {START_HINT}"),
        Ok(Err(e)) => panic!(
            "Redis is not reachable at {url} ({e}); {START_HINT} \
             (or set REDIS_URL to a running server)"
        ),
        Err(_) => panic!("Redis at {url} did not answer PING within {timeout:?}; {START_HINT}"),
    }
}

/// A Redis client for [`redis_url`] (connects lazily).
pub(crate) fn redis_client() -> redis::Client {
    redis::Client::open(redis_url()).expect("REDIS_URL is not a valid Redis URL")
}

/// A multiplexed connection to the test Redis, failing the test when it is unreachable.
pub(crate) async fn redis_connection() -> redis::aio::MultiplexedConnection {
    require_redis().await;
    redis_client()
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis")
}

/// Runs `scripts/services` with `args` (e.g. `["kafka-restart"]`) and fails the test if it
/// fails. For fault tests; it refuses to touch servers given in the environment.
pub(crate) async fn services(args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/services");
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let shown = args.join(" ");
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(script).args(&args).output()
    })
    .await
    .expect("services task panicked")
    .unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
    assert!(
        output.status.success(),
        "`scripts/services {shown}` failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}
