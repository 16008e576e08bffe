//! The handler: sends one mail per [`NotifyEvent`] over SMTP with `lettre`, and says which
//! failures are worth retrying.
//!
//! | failure                                           | kind      | what kourier does            |
//! |---------------------------------------------------|-----------|------------------------------|
//! | `to` is not an address (parse error)              | permanent | dead-letters at once         |
//! | SMTP `5xx` reply (e.g. `550 mailbox unavailable`) | permanent | dead-letters at once         |
//! | SMTP `4xx` reply (e.g. `451 try again later`)     | transient | retries, then dead-letters   |
//! | `421` reply, connection refused/reset, timeout    | unavailable | the record waits for the relay (breaker), no attempt used |
//!
//! A `4xx` reply is about this mail (greylisting, a full mailbox): retries are bounded by the
//! policy and a mail that keeps failing ends in the dead-letter topic, from where it can be
//! redriven. No answer at all (or `421 service not available`) is about the relay, not the
//! mail: [`HandlerError::unavailable`] makes the record wait for the relay without using up
//! its attempts, and the consumer's breaker stops sending mails until a probe gets through.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use kourier::{Handler, HandlerError, Message, async_trait};
use lettre::message::Mailbox;
use lettre::message::header::ContentType;
use lettre::transport::smtp::PoolConfig;
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};

use crate::event::NotifyEvent;

/// The sender of every mail.
pub(crate) const FROM: &str = "Kourier notifier <notifier@kourier.example>";
/// The domain of the `Message-ID`s (`<event id@MESSAGE_ID_DOMAIN>`).
pub(crate) const MESSAGE_ID_DOMAIN: &str = "kourier.example";

/// Sends [`NotifyEvent`]s as mails.
pub(crate) struct Mailer {
    /// `Some` until the mailer is dropped (see the `Drop` impl).
    transport: Option<AsyncSmtpTransport<Tokio1Executor>>,
    /// The runtime the mailer was made in.
    runtime: tokio::runtime::Handle,
    from: Mailbox,
    journal: Journal,
}

/// Workaround: kourier (as of this writing) drops the handler on its poll thread, outside the
/// Tokio runtime, and dropping lettre's connection pool spawns a task, which panics there
/// ("there is no reactor running"). Dropping the transport inside the runtime avoids that.
impl Drop for Mailer {
    fn drop(&mut self) {
        let _in_runtime = self.runtime.enter();
        drop(self.transport.take());
    }
}

impl fmt::Debug for Mailer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mailer")
            .field("from", &self.from)
            .finish_non_exhaustive()
    }
}

impl Mailer {
    /// A mailer speaking plain (unencrypted, unauthenticated) SMTP to `host:port`, as the
    /// loopback demo server expects. For a real relay use `AsyncSmtpTransport::relay(host)`
    /// or `::starttls_relay(host)` with credentials, and enable one of lettre's TLS features.
    ///
    /// Must be called inside a Tokio runtime: lettre's connection pool starts a task.
    pub(crate) fn plaintext(host: &str, port: u16, journal: Journal) -> Self {
        let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
            .port(port)
            .timeout(Some(Duration::from_secs(10)))
            .pool_config(PoolConfig::new().max_size(4))
            .build();
        Mailer {
            transport: Some(transport),
            runtime: tokio::runtime::Handle::current(),
            from: FROM.parse().expect("FROM is a valid mailbox"),
            journal,
        }
    }

    async fn send(&self, event: &NotifyEvent) -> Result<(), HandlerError> {
        let to: Mailbox = event.to.parse().map_err(|e| {
            HandlerError::permanent(format!("invalid recipient address {:?}: {e}", event.to))
        })?;
        let mail = lettre::Message::builder()
            // The event id, so the receiving side (and this demo's checks) can tell mails apart.
            .message_id(Some(format!("<{}@{MESSAGE_ID_DOMAIN}>", event.event_id)))
            .from(self.from.clone())
            .to(to)
            .subject(event.subject.as_str())
            .header(ContentType::TEXT_PLAIN)
            .body(event.body.clone())
            .map_err(|e| HandlerError::permanent(format!("cannot build the mail: {e}")))?;
        let transport = self
            .transport
            .as_ref()
            .expect("the transport is set until drop");
        // lettre's `Display` already includes its source, so the text is the whole story.
        match transport.send(mail).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_permanent() => Err(HandlerError::permanent(e.to_string())),
            // 421: "service not available, closing": the relay, not this mail.
            Err(e) if e.is_transient() && e.status().is_none_or(|c| c.to_string() != "421") => {
                Err(HandlerError::transient(e.to_string()))
            }
            Err(e) => Err(HandlerError::unavailable(e.to_string())),
        }
    }
}

#[async_trait]
impl Handler for Mailer {
    type Event = NotifyEvent;

    async fn handle(&self, message: &Message<NotifyEvent>) -> Result<(), HandlerError> {
        let event = message.event();
        let result = self.send(event).await;
        let outcome = match &result {
            Ok(()) => {
                tracing::info!(event_id = %event.event_id, user_id = %event.user_id, attempt = message.attempt(), "mail sent");
                Outcome::Sent
            }
            Err(e) if e.is_transient() => {
                tracing::info!(event_id = %event.event_id, attempt = message.attempt(), error = %e, "mail deferred, will retry");
                Outcome::Transient(e.to_string())
            }
            Err(e) if e.is_unavailable() => {
                tracing::info!(event_id = %event.event_id, error = %e, "smtp relay unavailable, the mail waits");
                Outcome::Unavailable(e.to_string())
            }
            Err(e) => Outcome::Permanent(e.to_string()),
        };
        self.journal.push(Attempt {
            event_id: event.event_id.clone(),
            user_id: event.user_id.clone(),
            to: event.to.clone(),
            subject: event.subject.clone(),
            partition: message.partition(),
            offset: message.offset(),
            attempt: message.attempt(),
            outcome,
        });
        result
    }
}

/// What one handler call did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    Sent,
    Transient(String),
    /// The relay did not answer (refused, cut, timed out): the record waited for it.
    Unavailable(String),
    Permanent(String),
}

/// One handler call, for the demo's summary.
#[derive(Debug, Clone)]
pub(crate) struct Attempt {
    pub(crate) event_id: String,
    pub(crate) user_id: String,
    pub(crate) to: String,
    pub(crate) subject: String,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) attempt: u32,
    pub(crate) outcome: Outcome,
}

/// Every handler call, in order; shared with the demo, which reports from it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Journal(Arc<Mutex<Vec<Attempt>>>);

impl Journal {
    fn push(&self, attempt: Attempt) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(attempt);
    }

    /// All calls so far.
    pub(crate) fn attempts(&self) -> Vec<Attempt> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}
