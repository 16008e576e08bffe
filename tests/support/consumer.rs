//! Running a [`RetryingConsumer`](kourier::RetryingConsumer) in a test: fresh topics and a
//! group, the settings the consumer tests share, the consumer in the background until the test
//! stops it, and waiting for what it does.

use std::future::Future;
use std::time::{Duration, Instant};

use kourier::{Codec, Handler, RetryingConsumer, RetryingConsumerBuilder};
use serde::de::DeserializeOwned;

pub(crate) use super::background::Running;
use super::services::bootstrap;
use super::topics::{create_topic_with_config, new_topic, unique_name};

/// A fresh topic with `partitions` partitions and a group of its own, both named after `name`.
pub(crate) async fn topic_and_group(name: &str, partitions: i32) -> (String, String) {
    let topic = new_topic(name, partitions).await;
    (topic, unique_name(&format!("{name}-g")))
}

/// [`topic_and_group`] and the dead-letter topic `<topic>.dlt` with as many partitions:
/// `(topic, group, dead-letter topic)`.
pub(crate) async fn setup(name: &str, partitions: i32) -> (String, String, String) {
    setup_with_dlt_config(name, partitions, &[]).await
}

/// [`setup`] with topic-level `configs` on the dead-letter topic.
pub(crate) async fn setup_with_dlt_config(
    name: &str,
    partitions: i32,
    configs: &[(&str, &str)],
) -> (String, String, String) {
    let (topic, group) = topic_and_group(name, partitions).await;
    let dlt_topic = format!("{topic}.dlt");
    create_topic_with_config(&dlt_topic, partitions, configs).await;
    (topic, group, dlt_topic)
}

/// A consumer of `topic` in `group` on the test broker, with the settings the consumer tests
/// share: commits every 200 ms, and a 6 s session (heartbeats every 500 ms) so that a member
/// that left is noticed within seconds. The retry policy and the rest are the test's.
pub(crate) fn builder<H>(handler: H, topic: &str, group: &str) -> RetryingConsumerBuilder<H>
where
    H: Handler,
    H::Event: DeserializeOwned,
{
    RetryingConsumer::builder(handler)
        .bootstrap_servers(bootstrap())
        .group_id(group)
        .topic(topic)
        .commit_interval(Duration::from_millis(200))
        .kafka_config("session.timeout.ms", "6000")
        .kafka_config("heartbeat.interval.ms", "500")
}

// A consumer running in the background until [`stop`](Running::stop), which fails the test
// unless it shuts down cleanly (so a crash anywhere in between fails it too).
impl Running {
    /// Builds the consumer (failing the test on a configuration error) and runs it.
    pub(crate) fn start<H: Handler, C: Codec<H::Event>>(
        builder: RetryingConsumerBuilder<H, C>,
    ) -> Running {
        Running::spawn(builder.build().expect("build"))
    }

    /// Fails the test if the consumer has stopped on its own.
    pub(crate) fn assert_alive(&self) {
        assert!(
            !self.task.is_finished(),
            "the consumer stopped on its own (it must keep running until the test stops it)"
        );
    }

    /// Stops the consumer: it must shut down cleanly within 60 s.
    pub(crate) async fn stop(self) {
        self.stop_within(Duration::from_secs(60)).await;
    }

    /// Stops the consumer: it must shut down cleanly within `timeout`.
    pub(crate) async fn stop_within(self, timeout: Duration) {
        let _report = self.stop_with_report(timeout).await;
    }

    /// Stops the consumer (it must shut down without an error within `timeout`) and returns
    /// what its shutdown reported.
    pub(crate) async fn stop_with_report(self, timeout: Duration) -> kourier::ShutdownReport {
        self.assert_alive();
        let _ = self.stop.send(());
        tokio::time::timeout(timeout, self.task)
            .await
            .unwrap_or_else(|_| panic!("consumer did not shut down within {timeout:?}"))
            .expect("consumer task panicked")
            .expect("consumer returned an error")
    }
}

/// Waits until `done` returns true (checked every 50 ms), failing the test after `timeout`.
pub(crate) async fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let every = Duration::from_millis(50);
    poll_until(what, timeout, every, || std::future::ready(done())).await;
}

/// Waits until the future `done` returns resolves to true (checked every 100 ms), failing the
/// test after `timeout`.
pub(crate) async fn wait_until<F, Fut>(what: &str, timeout: Duration, done: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    poll_until(what, timeout, Duration::from_millis(100), done).await;
}

async fn poll_until<F, Fut>(what: &str, timeout: Duration, every: Duration, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !done().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(every).await;
    }
}
