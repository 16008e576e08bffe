//! Log lines for conditions that persist (a broker down: librdkafka reports it at every
//! reconnect), and the rdkafka client context kourier gives the clients it creates so that
//! their logs and errors go through it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use tracing::{debug, error, info, warn};

/// Log lines for conditions that persist: the first occurrence of each distinct message is
/// logged at once, later ones at most once per interval with the count suppressed since.
#[derive(Debug)]
pub(crate) struct LogThrottle {
    interval: Duration,
    seen: Mutex<HashMap<String, (Instant, u64)>>,
}

impl LogThrottle {
    pub(crate) fn new(interval: Duration) -> Self {
        LogThrottle {
            interval,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Whether to log `key` now; if so, how many occurrences were suppressed since the last
    /// line. Keys are kept at most a few hundred (older ones are forgotten).
    pub(crate) fn admit(&self, key: &str) -> Option<u64> {
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        match seen.get_mut(key) {
            Some((last, suppressed)) => {
                if now.duration_since(*last) >= self.interval {
                    let n = *suppressed;
                    *last = now;
                    *suppressed = 0;
                    Some(n)
                } else {
                    *suppressed += 1;
                    None
                }
            }
            None => {
                if seen.len() >= 256 {
                    let interval = self.interval;
                    seen.retain(|_, (last, _)| now.duration_since(*last) < interval);
                }
                seen.insert(key.to_owned(), (now, 0));
                Some(0)
            }
        }
    }
}

/// How often a client kourier creates outside a consumer (a [`Publisher`](crate::Publisher)'s
/// producer, a [`TopicAdmin`](crate::topics::TopicAdmin)'s admin clients, a dead-letter sink
/// built on its own) logs a condition that persists. The clients a consumer creates (its
/// dead-letter and retry-tier producers, the admin client of `MissingTopics::create`) use the
/// consumer's `error_log_interval` instead.
pub(crate) const CLIENT_LOG_INTERVAL: Duration = Duration::from_secs(30);

/// A librdkafka log line under the target `librdkafka`: debug and info lines as they come,
/// warnings and errors once per interval per distinct line, with the count suppressed since.
pub(crate) fn log_throttled(
    throttle: &LogThrottle,
    level: RDKafkaLogLevel,
    fac: &str,
    log_message: &str,
) {
    match level {
        RDKafkaLogLevel::Debug => debug!(target: "librdkafka", "librdkafka: {fac} {log_message}"),
        RDKafkaLogLevel::Info | RDKafkaLogLevel::Notice => {
            info!(target: "librdkafka", "librdkafka: {fac} {log_message}");
        }
        _ => {
            let Some(suppressed) = throttle.admit(&throttle_key(fac, log_message)) else {
                return;
            };
            if matches!(level, RDKafkaLogLevel::Warning) {
                warn!(target: "librdkafka", suppressed, "librdkafka: {fac} {log_message}");
            } else {
                error!(target: "librdkafka", suppressed, "librdkafka: {fac} {log_message}");
            }
        }
    }
}

/// A librdkafka global error, once per interval per distinct error.
pub(crate) fn error_throttled(throttle: &LogThrottle, error: &KafkaError, reason: &str) {
    if let Some(suppressed) = throttle.admit(&throttle_key("error", &error.to_string())) {
        warn!(error = %error, reason, suppressed, "kafka client error");
    }
}

/// The rdkafka client context of the clients kourier creates for itself: the
/// [`Publisher`](crate::Publisher)'s producer, the dead-letter and retry-tier producers, and
/// [`TopicAdmin`](crate::topics::TopicAdmin)'s admin clients.
///
/// librdkafka reports a condition that persists (a broker that refuses connections, say) at
/// every reconnect; through this context its warnings and errors, and its error callbacks,
/// are logged once per distinct line per interval (30 s, or a consumer's
/// `error_log_interval` for the clients it creates), with the count suppressed since
/// (`suppressed`). Debug and info lines pass as they come. Log lines go to `tracing` under
/// the target `librdkafka`, as with rdkafka's default context.
///
/// It is the context type of the producer [`Publisher::producer`](crate::Publisher::producer)
/// returns: `FutureProducer<ThrottledLogContext>`.
#[derive(Debug, Clone)]
pub struct ThrottledLogContext {
    throttle: Arc<LogThrottle>,
}

impl ThrottledLogContext {
    /// A context that logs each distinct warning or error of librdkafka's at most once per
    /// `interval` (capped at a year), with the count suppressed since. For clients an
    /// application creates itself next to kourier's, e.g. with rdkafka's
    /// `ClientConfig::create_with_context`.
    pub fn new(interval: Duration) -> Self {
        ThrottledLogContext {
            throttle: Arc::new(LogThrottle::new(interval)),
        }
    }
}

/// Usable for a consumer too (no rebalance hooks of its own), e.g. `BaseConsumer<ThrottledLogContext>`.
impl rdkafka::consumer::ConsumerContext for ThrottledLogContext {}

impl ClientContext for ThrottledLogContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_throttled(&self.throttle, level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        error_throttled(&self.throttle, &error, reason);
    }
}

/// What makes two log lines "the same" for throttling: the facility and the message
/// without its numbers (durations, counts and ports vary between repeats).
fn throttle_key(fac: &str, message: &str) -> String {
    let mut key = String::with_capacity(fac.len() + 1 + message.len().min(160));
    key.push_str(fac);
    key.push(' ');
    // librdkafka folds its own repeats into "…, N identical error(s) suppressed)": the same
    // line as far as kourier is concerned.
    let message = message
        .find(" identical error(s) suppressed")
        .and_then(|end| message[..end].rfind(", "))
        .map_or(message, |cut| &message[..cut]);
    key.extend(
        message
            .chars()
            .filter(|c| !c.is_ascii_digit() && *c != ')')
            .take(160),
    );
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_message_is_logged_once_per_interval_with_the_suppressed_count() {
        let t = LogThrottle::new(Duration::from_millis(50));
        assert_eq!(t.admit("broker down"), Some(0));
        for _ in 0..10 {
            assert_eq!(t.admit("broker down"), None);
        }
        assert_eq!(
            t.admit("other"),
            Some(0),
            "distinct messages are not throttled together"
        );
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(t.admit("broker down"), Some(10));
        assert_eq!(t.admit("broker down"), None);
    }

    #[test]
    fn repeats_that_differ_only_in_numbers_are_the_same_line() {
        assert_eq!(
            throttle_key("FAIL", "connect failed (after 0ms in state CONNECT)"),
            throttle_key("FAIL", "connect failed (after 12ms in state CONNECT)")
        );
        assert_eq!(
            throttle_key("FAIL", "connect failed (after 0ms in state CONNECT)"),
            throttle_key(
                "FAIL",
                "connect failed (after 0ms in state CONNECT, 1 identical error(s) suppressed)"
            )
        );
    }
}
