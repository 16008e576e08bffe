//! Startup checks (delivery rule 13 in the crate docs): before subscribing, the cluster must answer and every
//! topic the consumer needs — the subscribed ones and those its dead-letter sink writes to —
//! must exist. A wrong world is a typed error within the startup timeout, not a hang.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use tracing::{info, warn};

use crate::clock;
use crate::consumer::schedule::Hub;
use crate::error::{Error, Result};
use crate::topics::{TopicAdmin, TopicSpec, cluster_unreachable};

/// What the startup checks need to know.
#[derive(Debug, Clone)]
pub(crate) struct StartupSettings {
    /// The bootstrap servers, for the error message.
    pub(crate) servers: String,
    /// How long the cluster may take to answer.
    pub(crate) timeout: Duration,
    /// The subscribed topics.
    pub(crate) topics: Vec<String>,
    /// Dead-letter (and other) topics that must exist too, with the source topic each
    /// serves.
    pub(crate) sink_topics: Vec<(String, String)>,
    /// Wait for missing topics to be created instead of failing (`MissingTopics::Wait`).
    pub(crate) wait_for_topics: bool,
    /// Create missing topics before the checks (see [`provision`]).
    pub(crate) create: Option<Provisioning>,
}

/// `MissingTopics::Create`: how missing topics are created.
#[derive(Debug, Clone)]
pub(crate) struct Provisioning {
    /// Partitions of a created source topic.
    pub(crate) partitions: i32,
    /// Raw settings for the admin client (security settings of the consumer).
    pub(crate) kafka_config: Vec<(String, String)>,
    /// How often the admin client logs a condition that persists (`error_log_interval`).
    pub(crate) log_interval: Duration,
}

/// Creates what is missing: subscribed topics with the configured partition count, then
/// the sink's topics with the partition count of the source topic each serves (so dead
/// letters keep their source partition). Existing topics are left as they are.
///
/// # Errors
/// [`Error::BrokersUnreachable`] naming the servers when the cluster does not answer within
/// the startup timeout (as from the startup checks: rule 13 in the crate docs);
/// [`Error::Topic`] when a broker answers and refuses to create a topic.
pub(crate) async fn provision(settings: &StartupSettings, create: &Provisioning) -> Result<()> {
    let started = Instant::now();
    create_missing(settings, create).await.map_err(|e| {
        if cluster_unreachable(&e) {
            warn!(servers = %settings.servers, error = %crate::error::error_chain(&e), "startup: the kafka cluster did not answer while creating missing topics");
            Error::BrokersUnreachable {
                servers: settings.servers.clone(),
                after: started.elapsed(),
            }
        } else {
            e
        }
    })
}

async fn create_missing(settings: &StartupSettings, create: &Provisioning) -> Result<()> {
    let mut admin = TopicAdmin::new(settings.servers.clone())
        .timeout(settings.timeout)
        .log_interval(create.log_interval);
    for (k, v) in &create.kafka_config {
        admin = admin.kafka_config(k.clone(), v.clone());
    }
    let sources: Vec<TopicSpec> = settings
        .topics
        .iter()
        .map(|t| TopicSpec::new(t.clone(), create.partitions))
        .collect();
    let report = admin.ensure(&sources).await?;
    let counts = admin.partitions(&settings.topics).await?;
    let sinks: Vec<TopicSpec> = settings
        .sink_topics
        .iter()
        .map(|(source, dlt)| {
            let partitions = report
                .partitions(source)
                .or(counts.get(source).copied().flatten())
                .unwrap_or(create.partitions);
            TopicSpec::new(dlt.clone(), partitions)
        })
        .collect();
    let sink_report = admin.ensure(&sinks).await?;
    let created: Vec<&String> = report
        .created()
        .iter()
        .chain(sink_report.created())
        .collect();
    if !created.is_empty() {
        info!(topics = ?created, "created missing topics (MissingTopics::Create)");
    }
    Ok(())
}

/// How often a waiting check asks again.
const RETRY_EVERY: Duration = Duration::from_millis(500);

/// Runs the checks. `Ok(false)` when a stop was requested while waiting.
///
/// # Errors
/// [`Error::BrokersUnreachable`] when no broker answered within the timeout;
/// [`Error::MissingTopics`] when topics are missing (and not waited for).
pub(crate) fn check<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    hub: &Hub,
    settings: &StartupSettings,
) -> Result<bool> {
    let started = Instant::now();
    // The cluster must stay unreachable for a whole timeout to fail the start: every answer
    // moves the deadline (a long wait for topics is not an outage).
    let mut unreachable_since = started;
    loop {
        if hub.stop_requested() {
            return Ok(false);
        }
        let remaining = clock::after(unreachable_since, settings.timeout)
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100));
        let existing = match consumer.fetch_metadata(None, remaining.min(Duration::from_secs(5))) {
            Ok(metadata) => metadata
                .topics()
                .iter()
                .filter(|t| t.error().is_none() && !t.partitions().is_empty())
                .map(|t| t.name().to_owned())
                .collect::<BTreeSet<_>>(),
            Err(e) => {
                hub.set_connected(false);
                if unreachable_since.elapsed() >= settings.timeout {
                    return Err(Error::BrokersUnreachable {
                        servers: settings.servers.clone(),
                        after: unreachable_since.elapsed(),
                    });
                }
                if let Some(suppressed) = hub.throttle.admit("startup: cluster unreachable") {
                    warn!(servers = %settings.servers, error = %e, suppressed, waited = ?unreachable_since.elapsed(), timeout = ?settings.timeout, "startup: the kafka cluster does not answer yet");
                }
                std::thread::sleep(RETRY_EVERY.min(remaining));
                continue;
            }
        };
        hub.set_connected(true);
        unreachable_since = Instant::now();
        let missing: Vec<String> = settings
            .topics
            .iter()
            .chain(settings.sink_topics.iter().map(|(_, dlt)| dlt))
            .filter(|t| !existing.contains(*t))
            .cloned()
            .collect();
        if missing.is_empty() {
            info!(topics = ?settings.topics, took = ?started.elapsed(), "startup checks passed: the cluster answers and every topic exists");
            return Ok(true);
        }
        if !settings.wait_for_topics {
            return Err(Error::MissingTopics {
                topics: missing,
                hint: "create them (kourier::topics::TopicAdmin, dead-letter topics with their \
                       source's partition count), or set \
                       missing_topics(MissingTopics::create(partitions)) on the consumer \
                       builder, or missing_topics(MissingTopics::Wait) to wait for them"
                    .into(),
            });
        }
        if let Some(suppressed) = hub.throttle.admit("startup: waiting for topics") {
            warn!(topics = ?missing, suppressed, "startup: waiting for topics to be created (MissingTopics::Wait)");
        }
        std::thread::sleep(RETRY_EVERY);
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::ClientConfig;
    use rdkafka::mocking::MockCluster;

    use super::*;

    /// `startup_timeout(Duration::MAX)`: the checks pass against a cluster that answers.
    /// Before, the first deadline (`unreachable_since + timeout`) panicked and nothing ran.
    #[test]
    fn a_startup_timeout_of_duration_max_checks_and_starts() {
        let mock = MockCluster::new(1).expect("mock cluster");
        mock.create_topic("t", 1, 1).expect("topic");
        mock.create_topic("t.dlt", 1, 1).expect("dead-letter topic");
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", mock.bootstrap_servers())
            .set("group.id", "g")
            .create()
            .expect("consumer");
        let settings = StartupSettings {
            servers: mock.bootstrap_servers(),
            timeout: Duration::MAX,
            topics: vec!["t".into()],
            sink_topics: vec![("t".into(), "t.dlt".into())],
            wait_for_topics: false,
            create: None,
        };
        let hub = crate::consumer::schedule::Hub::idle_for_tests();
        assert!(matches!(check(&consumer, &hub, &settings), Ok(true)));
    }
}
