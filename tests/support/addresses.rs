//! Where the services are: the Kafka bootstrap servers and the Redis URL, from the environment
//! or else where `scripts/services up` starts them. The throughput benchmark includes this file
//! too (`benches/throughput/services.rs`), so tests and benchmark find the same services.

use kourier::rdkafka::config::ClientConfig;

/// The Kafka bootstrap servers: `KAFKA_BOOTSTRAP_SERVERS`, else `127.0.0.1:9092`.
pub(crate) fn bootstrap() -> String {
    std::env::var("KAFKA_BOOTSTRAP_SERVERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

/// The Redis URL: `REDIS_URL`, else `redis://127.0.0.1:6379/`.
pub(crate) fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_owned())
}

/// A client config for the local broker, for code that builds its own clients.
pub(crate) fn client_config() -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap());
    config
}
