//! [`Message`]: a decoded record, as a handler receives it.

use std::sync::Arc;

use crate::idempotency::ClaimToken;
use crate::record::{Headers, RawRecord};
use crate::trace_context::TraceContext;
use crate::transactional::{OutputError, OutputRecord, Staged};

/// A decoded record, as a [`Handler`](crate::Handler) receives it.
///
/// Besides the typed event it carries the record's coordinates, key, headers and timestamp,
/// and which attempt this is (1 for the first try).
///
/// Cloning a message is cheap whatever the event type: the record and the decoded event are
/// shared (`Arc`), not copied, and `T` need not be `Clone`. That is what lets
/// [`handler_fn`](crate::handler_fn) give its closure an owned message for each attempt.
#[derive(Debug)]
pub struct Message<T> {
    raw: Arc<RawRecord>,
    attempt: u32,
    event: Arc<T>,
    claim: Option<ClaimToken>,
    delivery_count: Option<u16>,
    /// The attempt's staged output records: `Some` only with transactional output.
    outputs: Option<Arc<Staged>>,
    /// Held while any clone lives: for a record run ahead of its turn, the lease on its claim
    /// (its claim stays in use while its message may be in a batch).
    held: Option<Arc<dyn std::any::Any + Send + Sync>>,
}

impl<T> Clone for Message<T> {
    fn clone(&self) -> Self {
        Message {
            raw: Arc::clone(&self.raw),
            attempt: self.attempt,
            event: Arc::clone(&self.event),
            claim: self.claim.clone(),
            delivery_count: self.delivery_count,
            outputs: self.outputs.clone(),
            held: self.held.clone(),
        }
    }
}

impl<T> Message<T> {
    pub(crate) fn new(raw: Arc<RawRecord>, attempt: u32, event: T) -> Self {
        Message {
            raw,
            attempt,
            event: Arc::new(event),
            claim: None,
            delivery_count: None,
            outputs: None,
            held: None,
        }
    }

    /// Builds a message by hand, e.g. to unit-test a handler without Kafka: `raw` is a
    /// [`RawRecord`] or its builder, `attempt` counts from 1.
    ///
    /// ```
    /// use kourier::{Message, RawRecord};
    ///
    /// let message = Message::for_test(
    ///     RawRecord::builder("orders.v1").offset(7).key("customer-42"),
    ///     1,
    ///     "an event".to_owned(),
    /// );
    /// assert_eq!((message.offset(), message.key_str()), (7, Some("customer-42")));
    /// ```
    pub fn for_test(raw: impl Into<RawRecord>, attempt: u32, event: T) -> Self {
        Message::new(Arc::new(raw.into()), attempt, event)
    }

    pub(crate) fn set_attempt(&mut self, attempt: u32) {
        self.attempt = attempt;
    }

    #[cfg_attr(not(feature = "queue"), allow(dead_code))]
    pub(crate) fn set_delivery_count(&mut self, count: Option<u16>) {
        self.delivery_count = count;
    }

    /// A fresh, empty list of staged outputs for the next attempt (transactional output).
    pub(crate) fn set_outputs(&mut self, outputs: Option<Arc<Staged>>) {
        self.outputs = outputs;
    }

    pub(crate) fn set_claim_token(&mut self, claim: Option<ClaimToken>) {
        self.claim = claim;
    }

    /// The shared record.
    pub(crate) fn raw_shared(&self) -> &Arc<RawRecord> {
        &self.raw
    }

    /// Keeps `held` alive as long as this message or a clone of it lives.
    pub(crate) fn hold_while_alive(&mut self, held: Arc<dyn std::any::Any + Send + Sync>) {
        self.held = Some(held);
    }

    /// The decoded event.
    pub fn event(&self) -> &T {
        &self.event
    }

    /// Takes the decoded event: moved out when this is the message's last clone, else
    /// cloned.
    pub fn into_event(self) -> T
    where
        T: Clone,
    {
        Arc::unwrap_or_clone(self.event)
    }

    /// Source topic.
    pub fn topic(&self) -> &str {
        &self.raw.topic
    }

    /// Source partition.
    pub fn partition(&self) -> i32 {
        self.raw.partition
    }

    /// Offset in the source partition.
    pub fn offset(&self) -> i64 {
        self.raw.offset
    }

    /// The record key, `None` for a null key.
    pub fn key(&self) -> Option<&[u8]> {
        self.raw.key.as_deref()
    }

    /// The record key as UTF-8 text, if it is present and valid UTF-8.
    pub fn key_str(&self) -> Option<&str> {
        self.key().and_then(|k| std::str::from_utf8(k).ok())
    }

    /// The record headers, in order, names and values exactly as produced: a name is bytes
    /// ([`Header::key`](crate::Header::key)), which need not be UTF-8
    /// ([`Header::key_str`](crate::Header::key_str) gives it as text when it is).
    pub fn headers(&self) -> &Headers {
        &self.raw.headers
    }

    /// Record timestamp in milliseconds since the epoch.
    pub fn timestamp(&self) -> Option<i64> {
        self.raw.timestamp
    }

    /// Which attempt this is: 1 for the first try, 2 for the first retry, and so on.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// How many times the broker has delivered this record, this delivery included: the
    /// share group's delivery count in queue mode (feature `queue`, see `kourier::queue`),
    /// which counts deliveries across consumer crashes and lock expiries; `None` for a
    /// consumer-group record (a [`RetryingConsumer`](crate::RetryingConsumer)) and in
    /// [`Message::for_test`]. [`attempt`](Self::attempt) counts the attempts of this
    /// delivery only.
    pub fn delivery_count(&self) -> Option<u16> {
        self.delivery_count
    }

    /// The token of the idempotency claim this attempt holds on the record's dedup key, if
    /// it holds one.
    ///
    /// Set for each attempt (every attempt claims anew, so each has its own token). `None`
    /// without idempotency, for a record without a dedup key, when the store was unavailable
    /// and the consumer runs without dedup on outage (opted in), and in
    /// [`Message::for_test`]. The consumer renews the claim while the attempt runs; if a
    /// renewal finds it lost anyway (its lease ran out during a store outage), the attempt is
    /// cancelled at its next `.await`. Renewal stops when the partition's assignment is lost,
    /// and the attempt is dropped when a revoke or shutdown gives the record up.
    ///
    /// Use it to **fence a side effect**: cancellation comes at an `.await`, so an effect
    /// already on its way may still land after the claim passed to another worker. A
    /// downstream that can check the claim atomically with the effect can refuse such a late
    /// write: e.g. with the Redis store, a Lua script that applies the effect only while the
    /// store key (`<key_prefix><group>:<dedup key>`) still holds `inflight:<token>`; or a
    /// database that keeps the claim (your own store) and checks `token = $1` in the
    /// transaction that writes the effect. Tokens are random, not increasing, so a downstream
    /// cannot order them by itself: the check is against the store. Otherwise, pass the token
    /// along (a header of a published message, a column written with the effect) so that
    /// effects of different attempts can be told apart.
    ///
    /// ```
    /// use kourier::{HandlerError, Message};
    ///
    /// async fn handle(message: &Message<String>) -> Result<(), HandlerError> {
    ///     let attempt_id = message.claim_token().map(|t| t.as_str().to_owned());
    ///     // send_mail(message.event(), attempt_id.as_deref()).await?;
    ///     # let _ = attempt_id;
    ///     Ok(())
    /// }
    /// # let _ = handle;
    /// ```
    pub fn claim_token(&self) -> Option<&ClaimToken> {
        self.claim.as_ref()
    }

    /// Stages an output record, produced in the same Kafka transaction as this record's
    /// offset once this attempt succeeds (see [`transactional`](crate::transactional)).
    ///
    /// Outputs staged by an attempt that fails are dropped: the attempt that succeeds stages
    /// its own. Staging only keeps the record: a record Kafka refuses (too large, unknown
    /// topic) fails the transaction it is produced in, which stops the consumer.
    ///
    /// # Errors
    /// [`OutputError::NotTransactional`] when the consumer has no transactional setting.
    ///
    /// ```
    /// use kourier::transactional::OutputRecord;
    /// use kourier::{HandlerError, Message};
    ///
    /// async fn handle(message: &Message<String>) -> Result<(), HandlerError> {
    ///     let enriched = format!("{}!", message.event());
    ///     message.send_output(OutputRecord::new("out.v1").key("k").value(enriched))?;
    ///     Ok(())
    /// }
    /// # let _ = handle;
    /// ```
    pub fn send_output(&self, record: OutputRecord) -> Result<(), OutputError> {
        let outputs = self.outputs.as_ref().ok_or(OutputError::NotTransactional)?;
        outputs.push(record);
        Ok(())
    }

    /// This message with an empty list of staged outputs, as a transactional consumer gives
    /// each attempt: to unit-test a handler that calls [`send_output`](Self::send_output).
    ///
    /// ```
    /// use kourier::transactional::OutputRecord;
    /// use kourier::{Message, RawRecord};
    ///
    /// let message = Message::for_test(RawRecord::builder("in.v1"), 1, 7).with_staged_outputs();
    /// message.send_output(OutputRecord::new("out.v1").value("7")).unwrap();
    /// assert_eq!(message.staged_outputs().len(), 1);
    /// ```
    #[must_use]
    pub fn with_staged_outputs(mut self) -> Self {
        self.outputs = Some(Staged::new());
        self
    }

    /// The output records staged on this message so far (empty when not transactional).
    pub fn staged_outputs(&self) -> Vec<OutputRecord> {
        self.outputs
            .as_ref()
            .map(|o| o.snapshot())
            .unwrap_or_default()
    }

    /// The staged outputs of this attempt, taken out.
    pub(crate) fn take_outputs(&self) -> Vec<OutputRecord> {
        self.outputs.as_ref().map(|o| o.take()).unwrap_or_default()
    }

    /// The undecoded record.
    pub fn raw(&self) -> &RawRecord {
        &self.raw
    }

    /// The W3C trace context the record carries (its `traceparent` and `tracestate`
    /// headers), if any: the publisher's span. See [`TraceContext`].
    pub fn trace_context(&self) -> Option<TraceContext> {
        self.raw.trace_context()
    }
}
