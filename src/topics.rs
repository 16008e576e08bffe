//! Topic provisioning: which topics exist, and creating the missing ones.
//!
//! A consumer needs its source topic and its dead-letter topic (`<topic>.dlt` by default) to
//! exist before the first record fails. [`TopicAdmin`] answers which topics the cluster has
//! ([`partitions`](TopicAdmin::partitions), [`missing`](TopicAdmin::missing)) and creates the
//! missing ones from [`TopicSpec`]s ([`ensure`](TopicAdmin::ensure)), so an application (or a
//! deployment job) does not need admin code of its own.
//!
//! Every call is bounded by the admin's [`timeout`](TopicAdmin::timeout): a cluster that does
//! not answer is an [`Error::Topic`] of kind [`TopicError::Unreachable`] naming the bootstrap
//! servers, never a hang. librdkafka's blocking metadata requests run on Tokio's blocking
//! thread pool, so the calls do not stall the async runtime. Each call uses its own
//! short-lived admin client, which is gone (with its connections) when the call returns.
//! librdkafka's warnings and errors from those clients (a broker that refuses connections
//! is reported at every reconnect) are logged once per distinct line every 30 s, with the
//! count suppressed since, like the consumer's.
//!
//! [`java_partition`] says which partition of a topic a key goes to with the Java client's
//! default partitioner (the one kourier's [`Publisher`](crate::Publisher) uses).
//!
//! ```no_run
//! use kourier::topics::{TopicAdmin, TopicSpec};
//!
//! # async fn provision() -> kourier::Result<()> {
//! let admin = TopicAdmin::new("127.0.0.1:9092");
//! // The source topic, then its dead-letter topic with as many partitions as the source has
//! // (an existing source keeps the count it has).
//! let report = admin.ensure(&[TopicSpec::new("notify.v1", 6)]).await?;
//! let partitions = report.partitions("notify.v1").unwrap_or(6);
//! admin.ensure(&[TopicSpec::dead_letter("notify.v1", partitions)]).await?;
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use tokio::time::Instant;

pub use crate::error::TopicError;
use crate::error::{ConfigError, Error, Result};
use crate::log_throttle::{CLIENT_LOG_INTERVAL, ThrottledLogContext};
pub use crate::publisher::java_partition;

/// How long a [`TopicAdmin`] call may take in all, unless [`TopicAdmin::timeout`] says
/// otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Pause between two metadata requests while waiting for the cluster or for new topics.
const RETRY_INTERVAL: Duration = Duration::from_millis(200);

/// The longest one request to the cluster waits: librdkafka's limit for admin requests.
const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(3600);

type Admin = AdminClient<ThrottledLogContext>;

/// A topic to create when it is missing: name, partition count, replication factor and
/// topic-level configuration (`retention.ms`, `cleanup.policy`, ...).
///
/// ```
/// use kourier::topics::TopicSpec;
///
/// let spec = TopicSpec::new("notify.v1", 6)
///     .with_replication_factor(3)
///     .with_config("retention.ms", "604800000");
/// assert_eq!(spec.name(), "notify.v1");
/// assert_eq!(TopicSpec::dead_letter("notify.v1", 6).name(), "notify.v1.dlt");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    name: String,
    partitions: i32,
    replication_factor: Option<i32>,
    config: Vec<(String, String)>,
}

impl TopicSpec {
    /// A topic named `name` with `partitions` partitions, the broker's default replication
    /// factor (`default.replication.factor`) and no topic-level configuration.
    ///
    /// Nothing is checked here; [`TopicAdmin::ensure`] refuses an empty name, fewer than one
    /// partition or a replication factor below one, and the broker checks the rest.
    pub fn new(name: impl Into<String>, partitions: i32) -> Self {
        TopicSpec {
            name: name.into(),
            partitions,
            replication_factor: None,
            config: Vec::new(),
        }
    }

    /// The dead-letter topic of `source` as the default
    /// [`KafkaDeadLetterSink`](crate::KafkaDeadLetterSink) names it, `<source>.dlt`, with
    /// `partitions` partitions.
    ///
    /// Give it the source topic's partition count (from [`EnsureReport::partitions`] or
    /// [`TopicAdmin::partitions`]): the sink then writes each dead letter to the partition of
    /// its source record, so one source partition maps to one dead-letter partition. With a
    /// sink that names its topics otherwise, use [`TopicSpec::new`] with
    /// [`KafkaDeadLetterSink::topic_for`](crate::KafkaDeadLetterSink::topic_for).
    pub fn dead_letter(source: &str, partitions: i32) -> Self {
        TopicSpec::new(format!("{source}.dlt"), partitions)
    }

    /// Sets the replication factor (default: the broker's `default.replication.factor`).
    #[must_use]
    pub fn with_replication_factor(mut self, replication_factor: i32) -> Self {
        self.replication_factor = Some(replication_factor);
        self
    }

    /// Adds a topic-level configuration entry, e.g. `("retention.ms", "604800000")`. Later
    /// entries win over earlier ones with the same key.
    #[must_use]
    pub fn with_config(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        let key = key.into();
        self.config.retain(|(k, _)| *k != key);
        self.config.push((key, value.into()));
        self
    }

    /// The topic's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The partition count the topic is created with.
    pub fn partitions(&self) -> i32 {
        self.partitions
    }

    /// The replication factor, `None` for the broker's default.
    pub fn replication_factor(&self) -> Option<i32> {
        self.replication_factor
    }

    /// The topic-level configuration entries.
    pub fn config(&self) -> &[(String, String)] {
        &self.config
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.name.is_empty() {
            return Err(ConfigError::invalid(
                "topic",
                "a topic name cannot be empty",
            ));
        }
        if self.partitions < 1 {
            return Err(ConfigError::invalid(
                "partitions",
                format!(
                    "topic {} needs at least 1 partition, not {}",
                    self.name, self.partitions
                ),
            ));
        }
        if let Some(factor) = self.replication_factor
            && factor < 1
        {
            return Err(ConfigError::invalid(
                "replication_factor",
                format!("topic {} needs at least 1 replica, not {factor}", self.name),
            ));
        }
        Ok(())
    }

    fn to_new_topic(&self) -> NewTopic<'_> {
        // -1: the broker's default (CreateTopics v4+, Kafka 2.4+).
        let factor = self.replication_factor.unwrap_or(-1);
        self.config.iter().fold(
            NewTopic::new(&self.name, self.partitions, TopicReplication::Fixed(factor)),
            |topic, (k, v)| topic.set(k, v),
        )
    }
}

/// What [`TopicAdmin::ensure`] found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnsureReport {
    created: Vec<String>,
    existing: Vec<String>,
    partitions: BTreeMap<String, i32>,
}

impl EnsureReport {
    /// The topics this call created, in the order of the specs.
    pub fn created(&self) -> &[String] {
        &self.created
    }

    /// The topics that already existed, left as they are, in the order of the specs. A topic
    /// that someone else created between this call's check and its create request (another
    /// instance of the same service, say) is counted here.
    pub fn existing(&self) -> &[String] {
        &self.existing
    }

    /// Whether this call created `topic`.
    pub fn was_created(&self, topic: &str) -> bool {
        self.created.iter().any(|t| t == topic)
    }

    /// The partition count `topic` has now, as the cluster's metadata shows it (an existing
    /// topic keeps its own count, whatever its spec said); `None` for a topic that was not
    /// in the specs.
    pub fn partitions(&self, topic: &str) -> Option<i32> {
        self.partitions.get(topic).copied()
    }
}

/// Checks and creates topics: a small wrapper around rdkafka's [`AdminClient`] and metadata
/// requests.
///
/// Settings are plain values; each call creates its own admin client, uses it for at most
/// [`timeout`](Self::timeout), and drops it. Cheap to clone, `Send + Sync`.
///
/// ```no_run
/// use std::time::Duration;
/// use kourier::topics::TopicAdmin;
///
/// # async fn check() -> kourier::Result<()> {
/// let admin = TopicAdmin::new("broker-1:9093,broker-2:9093")
///     .kafka_config("security.protocol", "SASL_SSL")
///     .kafka_config("sasl.mechanism", "SCRAM-SHA-512")
///     .kafka_config("sasl.username", "notifier")
///     .kafka_config("sasl.password", "secret")
///     .timeout(Duration::from_secs(10));
/// let missing = admin.missing(&["notify.v1", "notify.v1.dlt"]).await?;
/// if !missing.is_empty() {
///     eprintln!("create these topics first: {missing:?}");
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct TopicAdmin {
    config: ClientConfig,
    timeout: Duration,
    /// The context of every admin client this admin (and its clones) creates: one log
    /// throttle across calls, so a call repeated against a dead cluster does not log anew.
    context: ThrottledLogContext,
}

impl fmt::Debug for TopicAdmin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Keys only: values may be credentials.
        let keys: Vec<&str> = self.config.config_map().keys().copied().collect();
        f.debug_struct("TopicAdmin")
            .field("bootstrap_servers", &self.bootstrap_servers())
            .field("timeout", &self.timeout)
            .field("kafka_config_keys", &keys)
            .finish()
    }
}

impl TopicAdmin {
    /// An admin for the cluster at `bootstrap_servers` (`host:port[,host:port...]`), with
    /// the [`DEFAULT_TIMEOUT`] of 30 s. It does not connect yet.
    pub fn new(bootstrap_servers: impl Into<String>) -> Self {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", bootstrap_servers.into())
            .set("client.id", "kourier-topic-admin")
            // Never let a metadata request create a topic with the broker's defaults.
            .set("allow.auto.create.topics", "false");
        TopicAdmin {
            config,
            timeout: DEFAULT_TIMEOUT,
            context: ThrottledLogContext::new(CLIENT_LOG_INTERVAL),
        }
    }

    /// How often librdkafka's warnings and errors that persist are logged (default 30 s);
    /// a consumer's provisioning uses its `error_log_interval`. A fresh throttle.
    pub(crate) fn log_interval(mut self, interval: Duration) -> Self {
        self.context = ThrottledLogContext::new(interval);
        self
    }

    /// Sets a raw librdkafka property (security settings, `client.id`, ...); applied after
    /// kourier's defaults, so it overrides them. A property librdkafka refuses makes the next
    /// call fail with [`Error::Kafka`] (operation `"create admin client"`).
    #[must_use]
    pub fn kafka_config(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.set(key.into(), value.into());
        self
    }

    /// How long one call may take in all (default [`DEFAULT_TIMEOUT`], 30 s): waiting for
    /// the cluster to answer, creating topics and waiting for them to show up in the
    /// metadata. A zero timeout makes every call fail with [`Error::Config`]; one above a
    /// year is taken as a year (delivery rule 17 in the crate docs). Each request to the
    /// cluster within a call waits at most an hour (librdkafka's limit), then is sent again.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = crate::clock::bounded(timeout);
        self
    }

    /// The bootstrap servers, as configured.
    pub fn bootstrap_servers(&self) -> &str {
        self.config.get("bootstrap.servers").unwrap_or_default()
    }

    /// The partition count of each of `topics`, `None` for a topic the cluster does not
    /// have. One metadata request for the whole cluster; no topic is created by it.
    ///
    /// # Errors
    /// [`Error::Topic`] with [`TopicError::Unreachable`] when the cluster does not answer
    /// within the timeout; [`Error::Config`] for a zero timeout; [`Error::Kafka`] when the
    /// admin client cannot be created.
    ///
    /// # Example
    /// ```no_run
    /// # async fn check() -> kourier::Result<()> {
    /// let admin = kourier::topics::TopicAdmin::new("127.0.0.1:9092");
    /// let counts = admin.partitions(&["notify.v1"]).await?;
    /// println!("notify.v1 has {:?} partitions", counts["notify.v1"]);
    /// # Ok(()) }
    /// ```
    pub async fn partitions(
        &self,
        topics: &[impl AsRef<str>],
    ) -> Result<BTreeMap<String, Option<i32>>> {
        let session = self.session()?;
        let view = session.metadata().await?;
        Ok(topics
            .iter()
            .map(|t| {
                let t = t.as_ref();
                (t.to_owned(), view.partitions(t))
            })
            .collect())
    }

    /// The topics among `topics` that the cluster does not have, in the given order.
    ///
    /// # Errors
    /// As [`partitions`](Self::partitions).
    ///
    /// # Example
    /// ```no_run
    /// # async fn check() -> kourier::Result<()> {
    /// let admin = kourier::topics::TopicAdmin::new("127.0.0.1:9092");
    /// assert!(admin.missing(&["notify.v1", "notify.v1.dlt"]).await?.is_empty());
    /// # Ok(()) }
    /// ```
    pub async fn missing(&self, topics: &[impl AsRef<str>]) -> Result<Vec<String>> {
        let counts = self.partitions(topics).await?;
        let mut missing = Vec::new();
        for t in topics {
            let t = t.as_ref();
            if counts[t].is_none() && !missing.iter().any(|m: &String| m == t) {
                missing.push(t.to_owned());
            }
        }
        Ok(missing)
    }

    /// Creates the topics of `specs` that the cluster does not have, and waits until every
    /// partition of the topics it created has a leader in the metadata, so producing and
    /// consuming can start.
    ///
    /// Existing topics are left as they are (their partition count and configuration are not
    /// changed; a count that differs from the spec is logged as a warning) and not waited
    /// for. A create request answered with "topic already exists" counts as success (two
    /// instances starting at the same time may both try), and that topic is waited for like
    /// a created one. While a just-started cluster is not ready to place replicas
    /// (no controller, no registered broker yet), the create request is repeated until the
    /// timeout.
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid spec (empty name, fewer than one partition, a
    /// replication factor below one, the same name twice) or a zero timeout, before anything
    /// connects; [`Error::Topic`] with [`TopicError::Unreachable`] when the cluster does not
    /// answer, [`TopicError::Create`] when the broker refuses a topic (naming it), or
    /// [`TopicError::NotReady`] when created topics have no leaders in time;
    /// [`Error::Kafka`] when the admin client cannot be created or the create request fails
    /// as a whole; [`Error::Timeout`] when the create request gets no answer in time. When
    /// one topic fails, others of the same call may have been created.
    ///
    /// # Example
    /// ```no_run
    /// use kourier::topics::{TopicAdmin, TopicSpec};
    ///
    /// # async fn provision() -> kourier::Result<()> {
    /// let report = TopicAdmin::new("127.0.0.1:9092")
    ///     .ensure(&[
    ///         TopicSpec::new("notify.v1", 6),
    ///         TopicSpec::dead_letter("notify.v1", 6),
    ///     ])
    ///     .await?;
    /// println!("created {:?}, already there {:?}", report.created(), report.existing());
    /// # Ok(()) }
    /// ```
    pub async fn ensure(&self, specs: &[TopicSpec]) -> Result<EnsureReport> {
        validate_specs(specs)?;
        let session = self.session()?;
        let mut view = session.metadata().await?;
        let mut report = EnsureReport::default();
        let mut pending: Vec<&TopicSpec> = Vec::new();
        for spec in specs {
            match view.partitions(&spec.name) {
                Some(count) => {
                    if count != spec.partitions {
                        tracing::warn!(
                            topic = %spec.name,
                            partitions = count,
                            wanted = spec.partitions,
                            "topic exists with a different partition count; left as it is"
                        );
                    }
                    report.existing.push(spec.name.clone());
                }
                None => pending.push(spec),
            }
        }
        let fresh = create_pending(&session, pending, view.brokers, &mut report).await?;
        if !fresh.is_empty() {
            view = session.wait_ready(&fresh).await?;
        }
        for spec in specs {
            if let Some(count) = view.partitions(&spec.name) {
                report.partitions.insert(spec.name.clone(), count);
            }
        }
        // Keep the specs' order in both lists.
        let position = |name: &String| specs.iter().position(|s| s.name == *name);
        report.created.sort_by_key(position);
        report.existing.sort_by_key(position);
        Ok(report)
    }

    fn session(&self) -> Result<Session> {
        if self.timeout.is_zero() {
            return Err(ConfigError::invalid("timeout", "must be greater than zero").into());
        }
        let admin: Admin = self
            .config
            .create_with_context(self.context.clone())
            .map_err(|e| Error::kafka("create admin client", e))?;
        Ok(Session {
            admin: Some(Arc::new(admin)),
            bootstrap_servers: self.bootstrap_servers().to_owned(),
            started: Instant::now(),
            timeout: self.timeout,
        })
    }
}

/// Whether `e`, from a [`TopicAdmin`] call, means the cluster did not answer (as opposed to
/// a broker that answered and refused): no metadata answer within the timeout, or a create
/// request that failed on the way (transport failure, all brokers down, no answer in time).
/// The consumer's provisioning turns these into [`Error::BrokersUnreachable`] (rule 13 in
/// the crate docs); refusals (authorization, invalid topic, policy) stay [`Error::Topic`].
pub(crate) fn cluster_unreachable(e: &Error) -> bool {
    let no_answer = |code: RDKafkaErrorCode| {
        matches!(
            code,
            RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::Resolve
                | RDKafkaErrorCode::NetworkException
                | RDKafkaErrorCode::OperationTimedOut
                | RDKafkaErrorCode::TimedOutQueue
        )
    };
    match e {
        Error::Topic(TopicError::Unreachable { .. }) => true,
        Error::Topic(TopicError::Create { code, .. }) => no_answer(*code),
        Error::Kafka {
            source: KafkaError::AdminOp(code),
            ..
        } => no_answer(*code),
        Error::Timeout { operation, .. } => *operation == "create topics",
        _ => false,
    }
}

/// Codes worth another create request while time is left: the cluster is (re)starting or
/// moving its controller. "Invalid replication factor" is what a just-started KRaft cluster
/// answers before its broker registered; it is retried only when the metadata shows enough
/// brokers for the requested factor, so a factor the cluster can never meet fails at once.
fn is_retriable(code: RDKafkaErrorCode, spec: &TopicSpec, brokers: usize) -> bool {
    match code {
        RDKafkaErrorCode::InvalidReplicationFactor => {
            spec.replication_factor.unwrap_or(1) as usize <= brokers
        }
        RDKafkaErrorCode::BrokerNotAvailable
        | RDKafkaErrorCode::NotController
        | RDKafkaErrorCode::RequestTimedOut
        | RDKafkaErrorCode::LeaderNotAvailable
        | RDKafkaErrorCode::NetworkException
        | RDKafkaErrorCode::OperationTimedOut
        | RDKafkaErrorCode::BrokerTransportFailure
        | RDKafkaErrorCode::AllBrokersDown => true,
        _ => false,
    }
}

/// The cluster as one metadata response showed it.
#[derive(Debug, Default)]
struct ClusterView {
    brokers: usize,
    /// Topic → (partition count, every partition has a leader and no error).
    topics: HashMap<String, (i32, bool)>,
}

impl ClusterView {
    fn from_metadata(metadata: &rdkafka::metadata::Metadata) -> Self {
        let topics = metadata
            .topics()
            .iter()
            .filter(|t| {
                t.error().map(RDKafkaErrorCode::from)
                    != Some(RDKafkaErrorCode::UnknownTopicOrPartition)
            })
            .map(|t| {
                let partitions = t.partitions();
                let ready = t.error().is_none()
                    && !partitions.is_empty()
                    && partitions
                        .iter()
                        .all(|p| p.leader() >= 0 && p.error().is_none());
                let count = i32::try_from(partitions.len()).unwrap_or(i32::MAX);
                (t.name().to_owned(), (count, ready))
            })
            .collect();
        ClusterView {
            brokers: metadata.brokers().len(),
            topics,
        }
    }

    fn partitions(&self, topic: &str) -> Option<i32> {
        self.topics.get(topic).map(|&(count, _)| count)
    }

    fn ready(&self, topic: &str) -> bool {
        self.topics.get(topic).is_some_and(|&(_, ready)| ready)
    }
}

/// One call's admin client and deadline. The client is dropped on the blocking pool: its
/// drop joins librdkafka's threads.
struct Session {
    admin: Option<Arc<Admin>>,
    bootstrap_servers: String,
    started: Instant,
    timeout: Duration,
}

impl Session {
    fn admin(&self) -> Arc<Admin> {
        Arc::clone(self.admin.as_ref().expect("the client lives until drop"))
    }

    fn remaining(&self) -> Duration {
        self.timeout.saturating_sub(self.started.elapsed())
    }

    /// What is left of the call's time, as one request's timeout: librdkafka refuses admin
    /// request timeouts above an hour (and takes every timeout in `i32` milliseconds).
    fn request_timeout(&self) -> Duration {
        self.remaining().min(MAX_REQUEST_TIMEOUT)
    }

    fn expired(&self) -> bool {
        self.remaining().is_zero()
    }

    /// Sleeps [`RETRY_INTERVAL`], or less when the deadline is closer.
    async fn pause(&self) {
        tokio::time::sleep(RETRY_INTERVAL.min(self.remaining())).await;
    }

    /// One metadata request of the whole cluster, on the blocking pool.
    async fn fetch(&self, timeout: Duration) -> std::result::Result<ClusterView, KafkaError> {
        let admin = self.admin();
        let fetched = tokio::task::spawn_blocking(move || {
            admin
                .inner()
                .fetch_metadata(None, timeout)
                .map(|m| ClusterView::from_metadata(&m))
        })
        .await;
        match fetched {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // The runtime is shutting down.
            Err(_) => Err(KafkaError::Canceled),
        }
    }

    /// The cluster's metadata, asked again until it answers with at least one broker or the
    /// deadline passes.
    async fn metadata(&self) -> Result<ClusterView> {
        let mut last_error = None;
        loop {
            let remaining = self.remaining();
            if remaining.is_zero() {
                return Err(TopicError::Unreachable {
                    bootstrap_servers: self.bootstrap_servers.clone(),
                    after: self.timeout,
                    source: last_error,
                }
                .into());
            }
            match self.fetch(self.request_timeout()).await {
                Ok(view) if view.brokers > 0 => return Ok(view),
                Ok(_) => {}
                Err(e) => last_error = Some(e),
            }
            self.pause().await;
        }
    }

    /// One create request for `specs`; the broker's answer for each.
    async fn create<'a>(
        &self,
        specs: &[&'a TopicSpec],
    ) -> Result<Vec<(&'a TopicSpec, std::result::Result<(), RDKafkaErrorCode>)>> {
        let remaining = self.request_timeout();
        let new_topics: Vec<NewTopic<'_>> = specs.iter().map(|s| s.to_new_topic()).collect();
        let options = AdminOptions::new()
            .request_timeout(Some(remaining))
            .operation_timeout(Some(remaining));
        let admin = self.admin();
        let answer = tokio::time::timeout(
            // librdkafka times the request out itself; this bounds the call if it did not.
            remaining.saturating_add(Duration::from_secs(1)),
            admin.create_topics(new_topics.iter(), &options),
        )
        .await
        .map_err(|_| Error::Timeout {
            operation: "create topics",
            after: self.started.elapsed(),
        })?
        .map_err(|e| Error::kafka("create topics", e))?;
        let mut outcomes = HashMap::new();
        for result in answer {
            match result {
                Ok(name) => outcomes.insert(name, Ok(())),
                Err((name, code)) => outcomes.insert(name, Err(code)),
            };
        }
        Ok(specs
            .iter()
            .map(|&spec| {
                // A topic missing from the answer is asked for again.
                let outcome = outcomes
                    .remove(&spec.name)
                    .unwrap_or(Err(RDKafkaErrorCode::RequestTimedOut));
                (spec, outcome)
            })
            .collect())
    }

    /// Waits until every partition of each of `topics` has a leader.
    async fn wait_ready(&self, topics: &[&str]) -> Result<ClusterView> {
        loop {
            let view = self.metadata().await?;
            let waiting: Vec<String> = topics
                .iter()
                .filter(|t| !view.ready(t))
                .map(|t| (*t).to_owned())
                .collect();
            if waiting.is_empty() {
                return Ok(view);
            }
            if self.expired() {
                return Err(TopicError::NotReady {
                    topics: waiting,
                    after: self.timeout,
                }
                .into());
            }
            self.pause().await;
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let Some(admin) = self.admin.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn_blocking(move || drop(admin));
            }
            Err(_) => drop(admin),
        }
    }
}

/// Refuses invalid specs and a topic given twice, before anything connects.
fn validate_specs(specs: &[TopicSpec]) -> Result<()> {
    for (i, spec) in specs.iter().enumerate() {
        spec.validate()?;
        if specs[..i].iter().any(|s| s.name == spec.name) {
            return Err(ConfigError::invalid(
                "topic",
                format!("topic {} is given twice", spec.name),
            )
            .into());
        }
    }
    Ok(())
}

/// Creates the `pending` topics, retrying what the cluster cannot create yet (until the
/// session expires); notes each in `report`. Returns the topics created by this call or, in
/// a race, by someone else: they are waited for until ready.
async fn create_pending<'s>(
    session: &Session,
    mut pending: Vec<&'s TopicSpec>,
    brokers: usize,
    report: &mut EnsureReport,
) -> Result<Vec<&'s str>> {
    let mut fresh = Vec::new();
    while !pending.is_empty() {
        let mut retry = Vec::new();
        for (spec, outcome) in session.create(&pending).await? {
            match outcome {
                Ok(()) => {
                    tracing::info!(
                        topic = %spec.name,
                        partitions = spec.partitions,
                        "created topic"
                    );
                    report.created.push(spec.name.clone());
                }
                Err(RDKafkaErrorCode::TopicAlreadyExists) => {
                    report.existing.push(spec.name.clone());
                }
                Err(code) if is_retriable(code, spec, brokers) && !session.expired() => {
                    tracing::debug!(topic = %spec.name, %code, "topic not created yet; retrying");
                    retry.push(spec);
                    continue;
                }
                Err(code) => {
                    return Err(TopicError::Create {
                        topic: spec.name.clone(),
                        code,
                    }
                    .into());
                }
            }
            fresh.push(spec.name.as_str());
        }
        pending = retry;
        if !pending.is_empty() {
            session.pause().await;
        }
    }
    Ok(fresh)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_are_validated_before_anything_connects() {
        assert!(TopicSpec::new("t", 1).validate().is_ok());
        assert!(TopicSpec::new("", 1).validate().is_err());
        assert!(TopicSpec::new("t", 0).validate().is_err());
        assert!(
            TopicSpec::new("t", 3)
                .with_replication_factor(0)
                .validate()
                .is_err()
        );
    }

    #[test]
    fn later_config_entries_replace_earlier_ones() {
        let spec = TopicSpec::new("t", 1)
            .with_config("retention.ms", "1")
            .with_config("cleanup.policy", "delete")
            .with_config("retention.ms", "2");
        assert_eq!(
            spec.config(),
            [
                ("cleanup.policy".to_owned(), "delete".to_owned()),
                ("retention.ms".to_owned(), "2".to_owned())
            ]
        );
    }

    #[test]
    fn dead_letter_spec_is_named_like_the_default_sink() {
        let spec = TopicSpec::dead_letter("notify.v1", 6);
        assert_eq!((spec.name(), spec.partitions()), ("notify.v1.dlt", 6));
        let sink = crate::KafkaDeadLetterSink::builder("127.0.0.1:9092")
            .build()
            .expect("sink builds without connecting");
        assert_eq!(sink.topic_for("notify.v1"), spec.name());
    }

    #[test]
    fn replication_factor_is_retried_only_when_enough_brokers_exist() {
        let code = RDKafkaErrorCode::InvalidReplicationFactor;
        assert!(is_retriable(code, &TopicSpec::new("t", 1), 1));
        let three = TopicSpec::new("t", 1).with_replication_factor(3);
        assert!(!is_retriable(code, &three, 1));
        assert!(is_retriable(code, &three, 3));
        assert!(!is_retriable(
            RDKafkaErrorCode::TopicAuthorizationFailed,
            &three,
            3
        ));
    }

    #[tokio::test]
    async fn zero_timeout_and_bad_specs_are_config_errors() {
        let admin = TopicAdmin::new("127.0.0.1:1");
        let twice = [TopicSpec::new("t", 1), TopicSpec::new("t", 2)];
        assert!(matches!(
            admin.ensure(&twice).await,
            Err(Error::Config(ConfigError::Invalid {
                setting: "topic",
                ..
            }))
        ));
        let zero = admin.timeout(Duration::ZERO);
        assert!(matches!(
            zero.missing(&["t"]).await,
            Err(Error::Config(ConfigError::Invalid {
                setting: "timeout",
                ..
            }))
        ));
    }

    #[test]
    fn no_answer_is_unreachable_and_a_refusal_is_not() {
        let create = |code| {
            Error::Topic(TopicError::Create {
                topic: "t".into(),
                code,
            })
        };
        assert!(cluster_unreachable(&Error::Topic(
            TopicError::Unreachable {
                bootstrap_servers: "b:1".into(),
                after: Duration::from_secs(1),
                source: None,
            }
        )));
        assert!(cluster_unreachable(&create(
            RDKafkaErrorCode::BrokerTransportFailure
        )));
        assert!(cluster_unreachable(&Error::kafka(
            "create topics",
            KafkaError::AdminOp(RDKafkaErrorCode::AllBrokersDown)
        )));
        assert!(cluster_unreachable(&Error::Timeout {
            operation: "create topics",
            after: Duration::from_secs(1),
        }));
        for refused in [
            RDKafkaErrorCode::TopicAuthorizationFailed,
            RDKafkaErrorCode::ClusterAuthorizationFailed,
            RDKafkaErrorCode::InvalidTopic,
            RDKafkaErrorCode::InvalidConfig,
            RDKafkaErrorCode::PolicyViolation,
        ] {
            assert!(!cluster_unreachable(&create(refused)), "{refused:?}");
        }
        assert!(!cluster_unreachable(&Error::Topic(TopicError::NotReady {
            topics: vec!["t".into()],
            after: Duration::from_secs(1),
        })));
        assert!(!cluster_unreachable(&Error::from(ConfigError::Missing(
            "x"
        ))));
    }

    #[test]
    fn debug_hides_config_values() {
        let admin = TopicAdmin::new("b:9092").kafka_config("sasl.password", "hunter2");
        let shown = format!("{admin:?}");
        assert!(shown.contains("sasl.password") && !shown.contains("hunter2"));
    }

    /// `timeout(Duration::MAX)` (what `startup_timeout(Duration::MAX)` with
    /// `MissingTopics::create` passes on) is taken as a year, and each request within a call
    /// waits at most librdkafka's hour. Before, a create call's bound (`remaining + 1 s`)
    /// overflowed and panicked (`tests/extreme_settings.rs` shows it against the broker).
    #[test]
    fn a_timeout_of_duration_max_is_a_year_of_hour_long_requests() {
        let admin = TopicAdmin::new("127.0.0.1:1").timeout(Duration::MAX);
        assert_eq!(admin.timeout, Duration::from_secs(365 * 86_400));
        let session = Session {
            admin: None,
            bootstrap_servers: String::new(),
            started: Instant::now(),
            timeout: admin.timeout,
        };
        assert_eq!(session.request_timeout(), Duration::from_secs(3600));
    }
}
