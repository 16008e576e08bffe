//! The poll thread's loop: the only place that touches the rdkafka consumer.
//!
//! It runs on its own OS thread so that nothing it does — polling, synchronous commits,
//! waiting for in-flight records during a revoke, closing the consumer — ever blocks the
//! async runtime, and so that handler work never delays polling (the consumer stays in its
//! group whatever the handlers and back-offs do).

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use tracing::{error, info, warn};

use super::commit::commit_settled;
use super::context::KourierContext;
use super::flow::apply_flow;
use super::hub::Hub;
use super::scheduler::Job;
use super::shutdown::shutdown;
use crate::error::Error;
use crate::record::RawRecord;

/// Settings of the poll loop.
#[derive(Debug, Clone)]
pub(crate) struct PollSettings {
    pub(crate) topics: Vec<String>,
    pub(crate) commit_interval: Duration,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) max_poll_batch: usize,
}

/// How long one poll waits for records.
const POLL_TIMEOUT: Duration = Duration::from_millis(50);

/// Runs the consumer until a stop is requested, then shuts down gracefully.
pub(crate) fn poll_loop(
    consumer: BaseConsumer<KourierContext>,
    hub: &Hub,
    settings: &PollSettings,
    spawn: &dyn Fn(Job),
) -> Result<(), Error> {
    let topics: Vec<&str> = settings.topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(|e| Error::kafka("subscribe", e))?;
    info!(topics = ?topics, "consumer subscribed");
    hub.metrics.start();

    let mut last_commit = Instant::now();
    let mut batch: Vec<RawRecord> = Vec::with_capacity(settings.max_poll_batch);
    let mut fatal = None;
    while !hub.stop_requested() {
        let changes = hub.lock().flow_control();
        apply_flow(&consumer, &hub.metrics, &changes);
        if last_commit.elapsed() >= settings.commit_interval {
            commit_settled(&consumer, hub, "interval");
            last_commit = Instant::now();
        }
        // A (nearly) full buffer: wait until workers made room for a batch (or POLL_TIMEOUT),
        // then take what fits — at least one record, so that polling goes on (group
        // membership, rebalances) without pulling records faster than handlers settle them.
        let (mut room, want) = {
            let s = hub.lock();
            (s.room(), s.batch_room(settings.max_poll_batch))
        };
        if room < want {
            hub.wait_until(POLL_TIMEOUT, |s| s.room() >= want);
            room = hub.lock().room();
        }
        let max_batch = room.clamp(1, settings.max_poll_batch);
        let mut timeout = if room >= want {
            POLL_TIMEOUT
        } else {
            Duration::ZERO
        };
        while batch.len() < max_batch {
            match consumer.poll(timeout) {
                Some(Ok(m)) => batch.push(RawRecord::from_message(&m)),
                Some(Err(KafkaError::MessageConsumptionFatal(code))) => {
                    error!(%code, "fatal consumer error");
                    fatal = Some(KafkaError::MessageConsumptionFatal(code));
                    break;
                }
                Some(Err(e)) => warn!(error = %e, "consumer error"),
                None => break,
            }
            timeout = Duration::ZERO;
        }
        if !batch.is_empty() {
            hub.metrics.consumed(&batch);
            let jobs = {
                let mut s = hub.lock();
                for record in batch.drain(..) {
                    s.enqueue(record);
                }
                s.take_jobs()
            };
            for job in jobs {
                spawn(job);
            }
        }
        if fatal.is_some() {
            break;
        }
    }

    shutdown(&consumer, hub, settings.shutdown_timeout);
    drop(consumer);
    info!("consumer closed");
    match fatal {
        Some(e) => Err(Error::kafka("consume", e)),
        None => Ok(()),
    }
}
