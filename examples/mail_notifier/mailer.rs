//! The handler: sends one mail per [`NotifyEvent`] over SMTP with `lettre`, and says which
//! failures are worth retrying. In batch mode (`--batch`), [`BulkMailer`] sends many mails in
//! one SMTP session and classifies each mail's failure the same way.
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

use kourier::batch::{BatchHandler, BatchOutcome};
use kourier::{Handler, HandlerError, Message, async_trait};
use lettre::message::Mailbox;
use lettre::message::header::ContentType;
use lettre::transport::smtp::PoolConfig;
use lettre::transport::smtp::client::AsyncSmtpConnection;
use lettre::transport::smtp::extension::ClientId;
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
        let mail = build_mail(&self.from, event)?;
        let transport = self
            .transport
            .as_ref()
            .expect("the transport is set until drop");
        transport.send(mail).await.map(drop).map_err(smtp_error)
    }
}

/// The mail for `event`; a recipient that is not an address is the event's own fault.
fn build_mail(from: &Mailbox, event: &NotifyEvent) -> Result<lettre::Message, HandlerError> {
    let to: Mailbox = event.to.parse().map_err(|e| {
        HandlerError::permanent(format!("invalid recipient address {:?}: {e}", event.to))
    })?;
    lettre::Message::builder()
        // The event id, so the receiving side (and this demo's checks) can tell mails apart.
        .message_id(Some(format!("<{}@{MESSAGE_ID_DOMAIN}>", event.event_id)))
        .from(from.clone())
        .to(to)
        .subject(event.subject.as_str())
        .header(ContentType::TEXT_PLAIN)
        .body(event.body.clone())
        .map_err(|e| HandlerError::permanent(format!("cannot build the mail: {e}")))
}

/// The kind of an SMTP failure (the table in the module docs).
fn smtp_error(e: lettre::transport::smtp::Error) -> HandlerError {
    // lettre's `Display` already includes its source, so the text is the whole story.
    match e {
        e if e.is_permanent() => HandlerError::permanent(e.to_string()),
        // 421: "service not available, closing": the relay, not this mail.
        e if e.is_transient() && e.status().is_none_or(|c| c.to_string() != "421") => {
            HandlerError::transient(e.to_string())
        }
        e => HandlerError::unavailable(e.to_string()),
    }
}

#[async_trait]
impl Handler for Mailer {
    type Event = NotifyEvent;

    async fn handle(&self, message: &Message<NotifyEvent>) -> Result<(), HandlerError> {
        let result = self.send(message.event()).await;
        self.journal.record(message, &result);
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

/// One call of the bulk path (`--batch`): how many mails it was given and how many SMTP
/// sessions it opened or tried to open for them (one, plus one after each failure: lettre
/// closes a session whose command failed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BulkCall {
    pub(crate) mails: usize,
    pub(crate) sessions: usize,
}

/// Every handler call, in order (and, in batch mode, every bulk call); shared with the demo,
/// which reports from it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Journal {
    attempts: Arc<Mutex<Vec<Attempt>>>,
    bulk_calls: Arc<Mutex<Vec<BulkCall>>>,
}

impl Journal {
    /// Logs one attempt of `message` and keeps it.
    fn record(&self, message: &Message<NotifyEvent>, result: &Result<(), HandlerError>) {
        let event = message.event();
        let outcome = match result {
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
        lock(&self.attempts).push(Attempt {
            event_id: event.event_id.clone(),
            user_id: event.user_id.clone(),
            to: event.to.clone(),
            subject: event.subject.clone(),
            partition: message.partition(),
            offset: message.offset(),
            attempt: message.attempt(),
            outcome,
        });
    }

    /// All calls so far.
    pub(crate) fn attempts(&self) -> Vec<Attempt> {
        lock(&self.attempts).clone()
    }

    /// All bulk calls so far (none unless in batch mode).
    pub(crate) fn bulk_calls(&self) -> Vec<BulkCall> {
        lock(&self.bulk_calls).clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The bulk path (`--batch`): sends a batch of [`NotifyEvent`]s over one SMTP session —
/// one connection and `EHLO` for the batch, then `MAIL FROM`/`RCPT TO`/`DATA` per mail, then
/// `QUIT` — and answers for each mail on its own ([`BatchOutcome::each`]), with the kinds of
/// the table above. Wrap it with [`kourier::batch::batched`] (see `notifier::bulk`).
///
/// lettre closes a session whose command failed (a `550` or `451` reply to `RCPT TO`), so the
/// mail after a failed one opens a new session. A relay that refuses the session (or cuts it)
/// is the relay's fault, not the mails': every mail of the batch not sent yet fails as
/// *unavailable* (it waits for the relay, no attempt used) without a new connection per mail.
pub(crate) struct BulkMailer {
    host: String,
    port: u16,
    hello: ClientId,
    from: Mailbox,
    journal: Journal,
}

impl fmt::Debug for BulkMailer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BulkMailer")
            .field("relay", &format_args!("{}:{}", self.host, self.port))
            .field("from", &self.from)
            .finish_non_exhaustive()
    }
}

impl BulkMailer {
    /// A bulk mailer speaking plain (unencrypted, unauthenticated) SMTP to `host:port`, like
    /// [`Mailer::plaintext`]; for a real relay pass `TlsParameters` to `connect_tokio1` and
    /// log in with `auth`.
    pub(crate) fn plaintext(host: &str, port: u16, journal: Journal) -> Self {
        BulkMailer {
            host: host.to_owned(),
            port,
            hello: ClientId::default(),
            from: FROM.parse().expect("FROM is a valid mailbox"),
            journal,
        }
    }

    async fn connect(&self) -> Result<AsyncSmtpConnection, HandlerError> {
        AsyncSmtpConnection::connect_tokio1(
            (self.host.as_str(), self.port),
            Some(Duration::from_secs(10)),
            &self.hello,
            None,
            None,
        )
        .await
        .map_err(smtp_error)
    }

    /// Sends each mail of `batch` it can; one result per mail, in order.
    async fn send_all(&self, batch: &[Message<NotifyEvent>]) -> Vec<Result<(), HandlerError>> {
        let mut results = Vec::with_capacity(batch.len());
        let mut session: Option<AsyncSmtpConnection> = None;
        let mut sessions = 0;
        // Set once the relay refused or cut a session: the rest of the batch waits for it.
        let mut relay_down: Option<String> = None;
        for message in batch {
            let result = match build_mail(&self.from, message.event()) {
                Err(e) => Err(e),
                Ok(_) if relay_down.is_some() => Err(HandlerError::unavailable(
                    relay_down.clone().unwrap_or_default(),
                )),
                Ok(mail) => {
                    let connection = match session.take() {
                        Some(c) => Ok(c),
                        None => {
                            sessions += 1;
                            self.connect().await
                        }
                    };
                    match connection {
                        Ok(mut c) => {
                            let sent = c
                                .send(mail.envelope(), &mail.formatted())
                                .await
                                .map(drop)
                                .map_err(smtp_error);
                            // A failed command closed the session (see the type's docs).
                            if !c.has_broken() {
                                session = Some(c);
                            }
                            sent
                        }
                        Err(e) => Err(e),
                    }
                }
            };
            if let Err(e) = &result
                && e.is_unavailable()
            {
                relay_down = Some(e.to_string());
            }
            self.journal.record(message, &result);
            results.push(result);
        }
        if let Some(mut c) = session {
            // The mails are sent; a failed goodbye changes nothing.
            let _ = c.quit().await;
        }
        lock(&self.journal.bulk_calls).push(BulkCall {
            mails: batch.len(),
            sessions,
        });
        results
    }
}

#[async_trait]
impl BatchHandler for BulkMailer {
    type Event = NotifyEvent;

    async fn handle_batch(&self, batch: &[Message<NotifyEvent>]) -> BatchOutcome {
        BatchOutcome::each(self.send_all(batch).await)
    }
}
