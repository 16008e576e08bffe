//! The [`Handler`] trait users implement, and how a handler reports failure.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;

use crate::error::BoxError;
use crate::message::Message;

/// Handles one event type. Implement this for your business logic.
///
/// `handle` is called once per attempt. Return `Ok(())` when the work is done; the record's
/// offset is then committed (once every lower offset of its partition is settled, too). Return
/// a [`HandlerError`] to say how the failure should be treated:
/// [`HandlerError::transient`] retries the record according to the consumer's
/// [`RetryPolicy`](crate::RetryPolicy), [`HandlerError::permanent`] dead-letters it at once,
/// [`HandlerError::unavailable`] says the downstream is down: the record waits for it without
/// using up an attempt (see [`BreakerPolicy`](crate::BreakerPolicy)).
/// `?` on any error converts it to a *transient* failure.
///
/// A handler is shared by all workers (`&self`), so it must be `Send + Sync`.
///
/// Put `#[async_trait]` ([`kourier::async_trait`](macro@crate::async_trait)) on the `impl` as
/// on the trait: without it rustc reports E0195 ("lifetime parameters or bounds on method do
/// not match the trait declaration"). For a closure, see [`handler_fn`].
///
/// ```
/// use kourier::{async_trait, Handler, HandlerError, Message};
/// use serde::Deserialize;
///
/// #[derive(Deserialize)]
/// struct Greeting { name: String }
///
/// struct Greeter;
///
/// #[async_trait]
/// impl Handler for Greeter {
///     type Event = Greeting;
///
///     async fn handle(&self, message: &Message<Greeting>) -> Result<(), HandlerError> {
///         if message.event().name.is_empty() {
///             return Err(HandlerError::permanent("empty name"));
///         }
///         println!("hello, {} (attempt {})", message.event().name, message.attempt());
///         Ok(())
///     }
/// }
/// ```
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// The decoded event type; the consumer's [`Codec`](crate::Codec) produces it.
    type Event: Send + Sync + 'static;

    /// Handles one attempt of one record.
    async fn handle(&self, message: &Message<Self::Event>) -> Result<(), HandlerError>;

    /// Not part of the API (it cannot be called or overridden outside kourier: `lane`'s type
    /// cannot be named or made there): [`handle`](Self::handle), told the records queued
    /// next in the record's lane. The batch adapter ([`batched`](crate::batch::batched))
    /// overrides it to put them in the record's batch; any other handler is simply called.
    #[doc(hidden)]
    fn handle_in_lane<'a>(
        &'a self,
        message: &'a Message<Self::Event>,
        lane: sealed::Lane<'_, Self::Event>,
    ) -> Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send + 'a>> {
        let _ = lane;
        self.handle(message)
    }
}

pub(crate) mod sealed {
    use crate::message::Message;

    /// The look-up of the records queued next in a record's lane, which the consumer hands
    /// to [`Handler::handle_in_lane`](super::Handler::handle_in_lane). Only kourier can make
    /// one (and a type outside kourier cannot name it), so the method stays kourier's own.
    #[allow(unreachable_pub)] // named in a public trait's method, so `pub`, but unreachable
    pub struct Lane<'a, T> {
        ahead: &'a (dyn Fn(usize) -> Vec<Message<T>> + Send + Sync + 'a),
    }

    impl<T> std::fmt::Debug for Lane<'_, T> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Lane").finish_non_exhaustive()
        }
    }

    impl<'a, T> Lane<'a, T> {
        /// The lane's next records, decoded, looked up by `ahead(max)` when asked for.
        pub(crate) fn new(
            ahead: &'a (dyn Fn(usize) -> Vec<Message<T>> + Send + Sync + 'a),
        ) -> Self {
            Lane { ahead }
        }

        /// At most `max` records queued next in the lane, in order, each decoded (up to the
        /// first that cannot be).
        pub(crate) fn ahead(&self, max: usize) -> Vec<Message<T>> {
            if max == 0 {
                return Vec::new();
            }
            let mut next = (self.ahead)(max);
            next.truncate(max);
            next
        }
    }
}

/// How a failed attempt should be treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FailureKind {
    /// May succeed later: retry according to the retry policy, then dead-letter.
    Transient,
    /// Will never succeed: dead-letter at once.
    Permanent,
    /// The handler panicked: a bug rather than an outage. Retried like a transient failure
    /// by default (see
    /// [`panic_policy`](crate::RetryingConsumerBuilder::panic_policy)); dead-lettered as
    /// [`DeadLetterReason::Panic`](crate::DeadLetterReason::Panic) when given
    /// up. Only the consumer makes failures of this kind.
    Panic,
    /// The downstream the handler calls is unavailable (refused connections, an HTTP 503, a
    /// circuit open elsewhere): the record is not at fault. It counts toward the consumer's
    /// [breaker](crate::BreakerPolicy) (with destinations, its destination's) and never
    /// toward the dead letter: the record waits
    /// and is tried again without using up an attempt. See [`HandlerError::unavailable`].
    Unavailable,
    /// The record's destination no longer exists: the record is dead-lettered at once (as
    /// [`Permanent`](Self::Permanent)), and with
    /// [destinations](crate::RetryingConsumerBuilder::destinations) so are the destination's
    /// other records for a while. See [`HandlerError::destination_gone`].
    DestinationGone,
}

/// A handler's failure: the cause, how to treat it, and an optional retry-after hint.
///
/// Any `std::error::Error + Send + Sync + 'static` converts into a *transient* `HandlerError`
/// with `?`; use [`HandlerError::permanent`] for failures that retrying cannot fix.
/// (`HandlerError` deliberately does not implement `std::error::Error` itself, which is
/// what makes that blanket conversion possible, as with `anyhow::Error`.)
pub struct HandlerError {
    kind: FailureKind,
    retry_after: Option<Duration>,
    source: BoxError,
}

impl HandlerError {
    /// The longest [`retry_after`](Self::retry_after) hint kourier honours: one day. A hint
    /// often comes from a downstream's reply (`Retry-After`, a rate limiter), which the
    /// consumer cannot trust; a longer one is taken as a day (delivery rule 17 in the crate
    /// docs), as Spring Kafka ignores back-off times more than a day ahead.
    pub const MAX_RETRY_AFTER: Duration = crate::clock::LONGEST_HINT;

    /// A failure worth retrying: a timeout, a dropped connection, an SMTP `4xx` reply, an
    /// HTTP `500`/`502`/`504` or `408`, a lock conflict. (A downstream that says it is
    /// down, such as an HTTP `503` or a refused connection, is better reported
    /// [unavailable](Self::unavailable); a destination that no longer exists, such as an
    /// HTTP `410`, [gone](Self::destination_gone).)
    pub fn transient(error: impl Into<BoxError>) -> Self {
        HandlerError {
            kind: FailureKind::Transient,
            retry_after: None,
            source: error.into(),
        }
    }

    /// The downstream is unavailable: the record is not at fault and must wait for it.
    ///
    /// Unlike a [transient](Self::transient) failure, this never uses up one of the record's
    /// attempts and never dead-letters it: the record is tried again (in order: nothing
    /// after it in its partition or key overtakes it) until the downstream answers, or until a
    /// revoke or shutdown gives it up unsettled (it is delivered again). It counts as a failed
    /// call for the consumer's [breaker](crate::BreakerPolicy), which stops dispatching
    /// other records while the downstream is down; without a breaker the record alone
    /// waits, backing off from 100 ms to 5 s (or as long as a
    /// [`retry_after`](Self::retry_after) hint asks). A hint also keeps an opening breaker
    /// open at least that long. With
    /// [destinations](crate::RetryingConsumerBuilder::destinations) it opens the record's
    /// destination's breaker instead (for at least the hint: an HTTP `429` with a
    /// `Retry-After` pauses that destination only), and counts for the consumer's breaker as
    /// one failure of that destination.
    ///
    /// Use it only for failures that say nothing about the record (a refused connection,
    /// HTTP `503 Service Unavailable` or `429 Too Many Requests`, a `421` SMTP greeting): a
    /// record that always gets this answer waits forever.
    pub fn unavailable(error: impl Into<BoxError>) -> Self {
        HandlerError {
            kind: FailureKind::Unavailable,
            retry_after: None,
            source: error.into(),
        }
    }

    /// The same failure for another record: its kind, its hint and its message (the source
    /// error itself is not `Clone`; its text is kept).
    pub(crate) fn duplicate(&self) -> Self {
        HandlerError {
            kind: self.kind,
            retry_after: self.retry_after,
            source: self.message().into(),
        }
    }

    /// A panic caught on the record's path, as the consumer reports it.
    pub(crate) fn panic(message: String) -> Self {
        HandlerError {
            kind: FailureKind::Panic,
            retry_after: None,
            source: message.into(),
        }
    }

    /// The record's destination no longer exists (an HTTP `410 Gone`, a deleted tenant, an
    /// uninstalled app's endpoint): retrying cannot help this record *or any other record of
    /// its destination*.
    ///
    /// The record is dead-lettered at once (reason `permanent`, like a
    /// [permanent](Self::permanent) failure). With
    /// [destinations](crate::RetryingConsumerBuilder::destinations) the destination is marked
    /// gone: its records waiting for it and those that come later are dead-lettered too,
    /// without calling the handler, for [`Destinations::with_gone`](crate::Destinations::with_gone)'s
    /// period (default an hour; or they wait instead, if so configured); then its next
    /// record probes it again. It does not count toward any breaker.
    pub fn destination_gone(error: impl Into<BoxError>) -> Self {
        HandlerError {
            kind: FailureKind::DestinationGone,
            retry_after: None,
            source: error.into(),
        }
    }

    /// A failure retrying cannot fix (an invalid address, a rejected payload, a business
    /// rule).
    pub fn permanent(error: impl Into<BoxError>) -> Self {
        HandlerError {
            kind: FailureKind::Permanent,
            retry_after: None,
            source: error.into(),
        }
    }

    /// Asks for the next attempt no sooner than `delay` (e.g. from a `Retry-After` reply).
    ///
    /// The consumer waits for the longer of this hint and the policy's own delay; the policy
    /// still decides *whether* to retry. Ignored for permanent failures. On an
    /// [unavailable](Self::unavailable) failure it is the least time the record waits, and
    /// the least time a breaker it opens stays open.
    ///
    /// A hint above [`MAX_RETRY_AFTER`](Self::MAX_RETRY_AFTER) (one day) is taken as one day:
    /// `retry_after(Duration::MAX)` makes the record wait a day, not forever, and never
    /// overflows a clock.
    #[must_use]
    pub fn retry_after(mut self, delay: Duration) -> Self {
        self.retry_after = Some(delay.min(Self::MAX_RETRY_AFTER));
        self
    }

    /// How the failure is to be treated.
    pub fn kind(&self) -> FailureKind {
        self.kind
    }

    /// Whether the failure is transient ([`FailureKind::Transient`]; an
    /// [unavailable](Self::is_unavailable) downstream is not counted here).
    pub fn is_transient(&self) -> bool {
        self.kind == FailureKind::Transient
    }

    /// Whether the failure says the downstream is unavailable ([`FailureKind::Unavailable`]).
    pub fn is_unavailable(&self) -> bool {
        self.kind == FailureKind::Unavailable
    }

    /// The retry-after hint, if any, at most [`MAX_RETRY_AFTER`](Self::MAX_RETRY_AFTER).
    pub fn retry_after_hint(&self) -> Option<Duration> {
        self.retry_after
    }

    /// The underlying error.
    pub fn source(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.source
    }

    /// The error's message with its causes (`error: cause: cause`), without the kind.
    /// This is what a dead letter's error header carries.
    pub fn message(&self) -> String {
        crate::error::error_chain(&*self.source)
    }

    /// Takes the underlying error.
    pub fn into_source(self) -> BoxError {
        self.source
    }
}

impl<E> From<E> for HandlerError
where
    E: std::error::Error + Send + Sync + 'static,
{
    fn from(error: E) -> Self {
        HandlerError::transient(error)
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("kind", &self.kind)
            .field("retry_after", &self.retry_after)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            FailureKind::Transient => "transient",
            FailureKind::Permanent => "permanent",
            FailureKind::Panic => "panic",
            FailureKind::Unavailable => "unavailable",
            FailureKind::DestinationGone => "destination gone",
        };
        write!(f, "{kind} failure: {}", self.message())
    }
}

/// Makes a [`Handler`] from an async closure that takes the [`Message`] by value.
///
/// [`Handler::handle`] borrows the message (`&Message<T>`); the closure gets an owned
/// [`Message<T>`] instead — the same message, a clone made for each attempt. Why not a
/// borrow: the closure returns a future, and on stable Rust a closure cannot return a future
/// that borrows its argument without boxing and a lifetime-annotated helper
/// (`for<'a> Fn(&'a Message<T>) -> BoxFuture<'a, _>`), which makes every call site write
/// `Box::pin(async move { .. })`. An owned message lets the plain `async move` block own what
/// it uses. The clone is cheap: a message shares its record and its decoded event (`Arc`), so
/// the event type need not be `Clone` and nothing is copied.
///
/// ```
/// use kourier::{handler_fn, HandlerError, Message};
///
/// let handler = handler_fn(|message: Message<String>| async move {
///     if message.event().is_empty() {
///         return Err(HandlerError::permanent("empty"));
///     }
///     Ok(())
/// });
/// # let _ = handler;
/// ```
pub fn handler_fn<T, F, Fut>(f: F) -> HandlerFn<T, F>
where
    T: Send + Sync + 'static,
    F: Fn(Message<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    HandlerFn {
        f,
        _event: PhantomData,
    }
}

/// The [`Handler`] made by [`handler_fn`].
pub struct HandlerFn<T, F> {
    f: F,
    _event: PhantomData<fn() -> T>,
}

impl<T, F> fmt::Debug for HandlerFn<T, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerFn")
            .field("event", &std::any::type_name::<T>())
            .finish()
    }
}

#[async_trait]
impl<T, F, Fut> Handler for HandlerFn<T, F>
where
    T: Send + Sync + 'static,
    F: Fn(Message<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    type Event = T;

    async fn handle(&self, message: &Message<T>) -> Result<(), HandlerError> {
        (self.f)(message.clone()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn question_mark_makes_a_transient_failure() {
        fn parse(s: &str) -> Result<u32, HandlerError> {
            Ok(s.parse::<u32>()?)
        }
        let err = parse("x").unwrap_err();
        assert!(err.is_transient());
        assert!(
            err.to_string()
                .starts_with("transient failure: invalid digit")
        );
    }

    #[test]
    fn causes_are_listed_once() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "send failed: {}", self.0) // prints its source itself
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let err = HandlerError::transient(Outer(std::io::Error::other("refused")));
        assert_eq!(err.message(), "send failed: refused");
        assert_eq!(err.to_string(), "transient failure: send failed: refused");
    }

    #[test]
    fn permanent_keeps_its_kind_and_hint_is_ignored_only_by_the_consumer() {
        let err = HandlerError::permanent("bad address").retry_after(Duration::from_secs(1));
        assert_eq!(err.kind(), FailureKind::Permanent);
        assert_eq!(err.retry_after_hint(), Some(Duration::from_secs(1)));
        assert_eq!(err.to_string(), "permanent failure: bad address");
    }

    #[test]
    fn unavailable_is_its_own_kind_and_keeps_its_hint() {
        let err =
            HandlerError::unavailable("connection refused").retry_after(Duration::from_secs(2));
        assert_eq!(err.kind(), FailureKind::Unavailable);
        assert!(err.is_unavailable() && !err.is_transient());
        assert_eq!(err.retry_after_hint(), Some(Duration::from_secs(2)));
        assert_eq!(err.to_string(), "unavailable failure: connection refused");
    }

    /// A hint is untrusted (it often comes from a downstream's reply): above a day it is
    /// taken as a day.
    #[test]
    fn a_retry_after_hint_is_capped_at_a_day() {
        let day = Duration::from_secs(86_400);
        for (asked, kept) in [
            (Duration::MAX, day),
            (day + Duration::from_nanos(1), day),
            (day, day),
            (Duration::from_secs(3), Duration::from_secs(3)),
            (Duration::ZERO, Duration::ZERO),
        ] {
            let err = HandlerError::unavailable("503").retry_after(asked);
            assert_eq!(err.retry_after_hint(), Some(kept), "{asked:?}");
        }
    }
}
