//! The handler: POSTs one webhook per [`WebhookEvent`] with `reqwest`, and says what each
//! reply means ([`classify`], the one place that decides).
//!
//! | reply                                            | kind             | what kourier does |
//! |--------------------------------------------------|------------------|-------------------|
//! | `2xx`                                            | success          | settled           |
//! | `429 Too Many Requests`                          | unavailable      | the endpoint pauses for its `Retry-After` (else its open interval); no attempt used |
//! | `503 Service Unavailable`, no connection         | unavailable      | the endpoint's breaker opens: its webhooks wait, one probe per open interval; no attempt used |
//! | `410 Gone`                                       | destination gone | dead-letters this webhook and the endpoint's others for an hour, without calling it |
//! | `408`, `425`, other `5xx`, no answer in time     | transient        | retried with back-off, then the retry tiers, then dead-lettered |
//! | other `4xx`, `3xx` (redirects are not followed)  | permanent        | dead-letters at once |
//!
//! The endpoint is the record's key, and so its *destination*: its failures hold only its own
//! webhooks (delivery rule 19 in the crate docs). An endpoint that is down (`503`, refused
//! connections) or asks for a pause (`429`) is not the webhook's fault:
//! [`HandlerError::unavailable`] makes the webhook wait without using up its attempts. A
//! `5xx` or a timeout may be about this one webhook (a payload the receiver chokes on): it
//! is [transient](HandlerError::transient), so the retry policy bounds it; when two webhooks
//! of one endpoint fail in a row three times, the endpoint's breaker opens all the same.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use kourier::{Handler, HandlerError, Message, async_trait};
use reqwest::StatusCode;
use reqwest::header::RETRY_AFTER;
use tokio::time::Instant;

use crate::event::{WEBHOOK_ID_HEADER, WebhookEvent};

/// At most this much of a reply's body goes into the error (and so into a dead letter).
const BODY_EXCERPT: usize = 120;

/// What came back from one POST: the part [`classify`] needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    /// The endpoint answered.
    Answered {
        status: u16,
        /// Its `Retry-After`, if it sent one that parses.
        retry_after: Option<Duration>,
        /// The start of the body, for the error message.
        body: String,
    },
    /// Connected and sent, but no (whole) answer within the request timeout.
    TimedOut,
    /// No connection: refused, unreachable, or not made within the connect timeout.
    NoConnection(String),
    /// Another transport failure (the connection cut mid-reply, ...).
    Broken(String),
}

/// The one decision: what a reply from `endpoint` means for the webhook. See the module
/// docs for the table.
pub(crate) fn classify(endpoint: &str, reply: &Reply) -> Result<(), HandlerError> {
    let (status, retry_after, body) = match reply {
        Reply::Answered {
            status,
            retry_after,
            body,
        } => (*status, *retry_after, body.as_str()),
        Reply::TimedOut => {
            return Err(HandlerError::transient(format!(
                "{endpoint}: no answer within the request timeout"
            )));
        }
        Reply::NoConnection(e) => {
            return Err(HandlerError::unavailable(format!(
                "{endpoint}: cannot connect: {e}"
            )));
        }
        Reply::Broken(e) => return Err(HandlerError::transient(format!("{endpoint}: {e}"))),
    };
    if (200..300).contains(&status) {
        return Ok(());
    }
    let reason = StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let mut message = format!("{endpoint}: {status} {reason}");
    if !body.is_empty() {
        message = format!("{message}: {body}");
    }
    let hinted = |error: HandlerError| match retry_after {
        Some(delay) => error.retry_after(delay),
        None => error,
    };
    Err(match status {
        // Only the endpoint's own pause: its other webhooks wait too, nobody else's.
        429 | 503 => hinted(HandlerError::unavailable(message)),
        410 => hinted(HandlerError::destination_gone(message)),
        408 | 425 | 500..=599 => hinted(HandlerError::transient(message)),
        _ => HandlerError::permanent(message),
    })
}

/// A `Retry-After` value: seconds (`120`) or an HTTP date (`Wed, 21 Oct 2026 07:28:00 GMT`,
/// counted from `now`; a date past is no wait). `None` when it is neither.
pub(crate) fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Too many digits for a u64 is a very long wait (kourier takes more than a day as a day).
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

/// POSTs webhooks; shared by all of the consumer's workers.
pub(crate) struct Deliverer {
    client: reqwest::Client,
    journal: Journal,
}

impl fmt::Debug for Deliverer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Deliverer").finish_non_exhaustive()
    }
}

impl Deliverer {
    /// A client that gives each request `timeout` in all (2 s of it at most to connect),
    /// follows no redirect (a webhook endpoint answers itself; following one would let it
    /// send our requests elsewhere) and uses no proxy.
    pub(crate) fn new(timeout: Duration, journal: Journal) -> reqwest::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(2)))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .user_agent("kourier-webhooks-example")
            .build()?;
        Ok(Deliverer { client, journal })
    }

    /// POSTs the webhook; what came back.
    async fn post(&self, event: &WebhookEvent) -> Reply {
        let body = serde_json::json!({
            "id": event.event_id,
            "type": event.kind,
            "data": event.data,
        });
        let sent = self
            .client
            .post(&event.url)
            .header(WEBHOOK_ID_HEADER, &event.event_id)
            .json(&body)
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            // A connect timeout is a connect error too: no connection, the endpoint is down.
            Err(e) if e.is_connect() => return Reply::NoConnection(error_chain(&e)),
            Err(e) if e.is_timeout() => return Reply::TimedOut,
            Err(e) => return Reply::Broken(error_chain(&e)),
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        // Read the body (so the connection can be used again) and keep its start.
        let body = match response.bytes().await {
            Ok(bytes) => excerpt(&String::from_utf8_lossy(&bytes)),
            Err(e) if e.is_timeout() => return Reply::TimedOut,
            Err(e) => return Reply::Broken(error_chain(&e)),
        };
        Reply::Answered {
            status,
            retry_after,
            body,
        }
    }
}

#[async_trait]
impl Handler for Deliverer {
    type Event = WebhookEvent;

    async fn handle(&self, message: &Message<WebhookEvent>) -> Result<(), HandlerError> {
        let event = message.event();
        let reply = self.post(event).await;
        let result = classify(&event.endpoint_id, &reply);
        let outcome = match &result {
            Ok(()) => Outcome::Delivered,
            Err(e) => {
                let text = e.message();
                match e.kind() {
                    kourier::FailureKind::Unavailable => Outcome::Unavailable(text),
                    kourier::FailureKind::DestinationGone => Outcome::Gone(text),
                    kourier::FailureKind::Permanent => Outcome::Permanent(text),
                    _ => Outcome::Transient(text),
                }
            }
        };
        tracing::debug!(endpoint = %event.endpoint_id, event_id = %event.event_id, attempt = message.attempt(), ?outcome, "webhook call");
        self.journal.push(Call {
            endpoint_id: event.endpoint_id.clone(),
            event_id: event.event_id.clone(),
            topic: message.topic().to_owned(),
            attempt: message.attempt(),
            outcome,
            at: Instant::now(),
        });
        result
    }
}

/// What one handler call did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    Delivered,
    Transient(String),
    /// The endpoint was down or asked for a pause: the webhook waited, no attempt used.
    Unavailable(String),
    /// The endpoint is gone: dead-lettered with its endpoint's other webhooks.
    Gone(String),
    Permanent(String),
}

/// One handler call, for the demo's summary.
#[derive(Debug, Clone)]
pub(crate) struct Call {
    pub(crate) endpoint_id: String,
    pub(crate) event_id: String,
    /// The source topic, or the retry tier's topic the webhook came back from.
    pub(crate) topic: String,
    pub(crate) attempt: u32,
    pub(crate) outcome: Outcome,
    pub(crate) at: Instant,
}

/// Every handler call, in order; shared with the demo, which reports from it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Journal(Arc<Mutex<Vec<Call>>>);

impl Journal {
    fn push(&self, call: Call) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(call);
    }

    /// All calls so far.
    pub(crate) fn calls(&self) -> Vec<Call> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// An error with its causes (`error: cause: cause`): reqwest's own text names only the step.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}

/// The first [`BODY_EXCERPT`] characters of `text`, on one line.
fn excerpt(text: &str) -> String {
    let line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(BODY_EXCERPT) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kourier::FailureKind;

    fn answered(status: u16, retry_after: Option<u64>) -> Reply {
        Reply::Answered {
            status,
            retry_after: retry_after.map(Duration::from_secs),
            body: String::new(),
        }
    }

    fn kind(reply: &Reply) -> Option<FailureKind> {
        classify("ep-1", reply).err().map(|e| e.kind())
    }

    fn hint(reply: &Reply) -> Option<Duration> {
        classify("ep-1", reply).err()?.retry_after_hint()
    }

    #[test]
    fn two_hundreds_are_delivered() {
        for status in [200, 201, 202, 204, 299] {
            assert!(
                classify("ep-1", &answered(status, None)).is_ok(),
                "{status}"
            );
        }
    }

    #[test]
    fn server_errors_and_timeouts_are_transient() {
        for status in [408, 425, 500, 502, 504, 599] {
            assert_eq!(
                kind(&answered(status, None)),
                Some(FailureKind::Transient),
                "{status}"
            );
        }
        assert_eq!(kind(&Reply::TimedOut), Some(FailureKind::Transient));
        assert_eq!(
            kind(&Reply::Broken(
                "connection closed before message completed".into()
            )),
            Some(FailureKind::Transient)
        );
    }

    #[test]
    fn a_503_or_no_connection_says_the_endpoint_is_down() {
        assert_eq!(kind(&answered(503, None)), Some(FailureKind::Unavailable));
        assert_eq!(hint(&answered(503, None)), None);
        assert_eq!(
            hint(&answered(503, Some(30))),
            Some(Duration::from_secs(30)),
            "its Retry-After is honoured"
        );
        let refused = Reply::NoConnection("tcp connect error: Connection refused".into());
        assert_eq!(kind(&refused), Some(FailureKind::Unavailable));
    }

    #[test]
    fn a_429_pauses_the_endpoint_for_its_retry_after() {
        assert_eq!(
            kind(&answered(429, Some(2))),
            Some(FailureKind::Unavailable)
        );
        assert_eq!(hint(&answered(429, Some(2))), Some(Duration::from_secs(2)));
        assert_eq!(hint(&answered(429, None)), None, "else its open interval");
    }

    #[test]
    fn a_410_says_the_endpoint_is_gone() {
        assert_eq!(
            kind(&answered(410, None)),
            Some(FailureKind::DestinationGone)
        );
    }

    #[test]
    fn other_client_errors_and_redirects_are_permanent() {
        for status in [400, 401, 403, 404, 405, 413, 422, 301, 302, 307] {
            assert_eq!(
                kind(&answered(status, None)),
                Some(FailureKind::Permanent),
                "{status}"
            );
        }
    }

    #[test]
    fn the_message_names_the_endpoint_the_status_and_the_body() {
        let reply = Reply::Answered {
            status: 422,
            retry_after: None,
            body: "missing field `amount`".into(),
        };
        let error = classify("acme-billing", &reply).unwrap_err();
        assert_eq!(
            error.message(),
            "acme-billing: 422 Unprocessable Entity: missing field `amount`"
        );
    }

    #[test]
    fn retry_after_is_seconds_or_an_http_date() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2026 07:28:00 GMT").unwrap();
        let parse = |v: &str| parse_retry_after(v, now);
        assert_eq!(parse("120"), Some(Duration::from_secs(120)));
        assert_eq!(parse(" 0 "), Some(Duration::ZERO));
        assert_eq!(
            parse("99999999999999999999999"),
            Some(Duration::from_secs(u64::MAX)),
            "kourier caps hints at a day"
        );
        assert_eq!(
            parse("Wed, 21 Oct 2026 07:28:30 GMT"),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse("Wed, 21 Oct 2026 07:00:00 GMT"),
            Some(Duration::ZERO),
            "a date past"
        );
        for junk in ["", "-1", "1.5", "soon", "Wed, 21 Oct 2026"] {
            assert_eq!(parse(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn excerpts_are_one_short_line() {
        assert_eq!(excerpt("  a\n b\t c "), "a b c");
        let long = "é".repeat(200);
        assert_eq!(excerpt(&long).chars().count(), BODY_EXCERPT + 1);
    }
}
