//! Handlers whose work blocks its thread (a synchronous SMTP or HTTP client, file I/O, heavy
//! CPU): [`BlockingHandler`] and the [`blocking`] adapter that runs each attempt on Tokio's
//! blocking thread pool, so the runtime's worker threads — and the application's other tasks
//! on them — stay responsive.
//!
//! A plain async [`Handler`] that calls `std::thread::sleep` or a blocking client freezes the
//! runtime thread it runs on: other records, timers and the application's own tasks on that
//! thread wait until it returns. Do not do that; implement [`BlockingHandler`] instead.
//!
//! What a [`handler_timeout`](crate::RetryingConsumerBuilder::handler_timeout) can do to a
//! blocking attempt: the worker stops waiting for it when the timeout passes (the attempt
//! counts as a transient failure and may be retried), but the thread keeps running the
//! attempt to its end — nothing can interrupt blocking code from outside. The same holds at
//! the shutdown deadline. Bound the blocking call itself (a socket timeout) when it matters.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

use crate::handler::{Handler, HandlerError};
use crate::message::Message;

/// Handles one event type with blocking code. Wrap it with [`blocking`] to get a
/// [`Handler`].
///
/// ```
/// use kourier::{blocking, BlockingHandler, HandlerError, Message};
///
/// struct SyncMailer;
///
/// impl BlockingHandler for SyncMailer {
///     type Event = String;
///
///     fn handle(&self, message: &Message<String>) -> Result<(), HandlerError> {
///         // a synchronous client, e.g. a blocking SMTP send
///         std::thread::sleep(std::time::Duration::from_millis(1));
///         if message.event().is_empty() {
///             return Err(HandlerError::permanent("empty"));
///         }
///         Ok(())
///     }
/// }
///
/// let handler = blocking(SyncMailer); // a kourier::Handler
/// # let _ = handler;
/// ```
pub trait BlockingHandler: Send + Sync + 'static {
    /// The decoded event type. It is cloned (with the message) into the blocking thread.
    type Event: Clone + Send + Sync + 'static;

    /// Handles one attempt of one record, on a blocking-pool thread.
    ///
    /// # Errors
    /// A [`HandlerError`] saying how the failure is to be treated, as for
    /// [`Handler::handle`].
    fn handle(&self, message: &Message<Self::Event>) -> Result<(), HandlerError>;
}

/// Runs a [`BlockingHandler`] on Tokio's blocking thread pool (`spawn_blocking`): the
/// [`Handler`] to give the consumer. A panic in the blocking code is the handler's panic
/// (failure kind `panic`), as for an async handler.
pub fn blocking<H: BlockingHandler>(handler: H) -> Blocking<H> {
    Blocking(Arc::new(handler))
}

/// The [`Handler`] made by [`blocking`].
pub struct Blocking<H>(Arc<H>);

impl<H> fmt::Debug for Blocking<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Blocking")
            .field(&std::any::type_name::<H>())
            .finish()
    }
}

#[async_trait]
impl<H: BlockingHandler> Handler for Blocking<H> {
    type Event = H::Event;

    async fn handle(&self, message: &Message<H::Event>) -> Result<(), HandlerError> {
        let handler = self.0.clone();
        let message = message.clone();
        match tokio::task::spawn_blocking(move || handler.handle(&message)).await {
            Ok(result) => result,
            // The worker's panic guard turns this into a failure of kind `panic`.
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(HandlerError::transient(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::record::RawRecord;

    struct Sleeper;

    impl BlockingHandler for Sleeper {
        type Event = u32;

        fn handle(&self, message: &Message<u32>) -> Result<(), HandlerError> {
            std::thread::sleep(Duration::from_millis(200));
            match *message.event() {
                0 => Ok(()),
                1 => Err(HandlerError::permanent("one")),
                _ => panic!("event {}", message.event()),
            }
        }
    }

    fn message(event: u32) -> Message<u32> {
        let raw = RawRecord {
            topic: "t".into(),
            partition: 0,
            offset: 0,
            key: None,
            value: None,
            headers: crate::record::Headers::new(),
            timestamp: None,
            log_append_time: false,
        };
        Message::for_test(raw, 1, event)
    }

    /// While the blocking attempt sleeps, a task on the same single-threaded runtime keeps
    /// running: the runtime thread is not blocked.
    #[tokio::test(flavor = "current_thread")]
    async fn a_blocking_attempt_leaves_the_runtime_thread_free() {
        let h = blocking(Sleeper);
        let ticks = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counter = ticks.clone();
        let ticker = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(10)).await;
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
        h.handle(&message(0)).await.expect("ok");
        ticker.abort();
        let n = ticks.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            n >= 5,
            "the runtime ticked only {n} times during a 200 ms block"
        );
        let err = h.handle(&message(1)).await.unwrap_err();
        assert_eq!(err.kind(), crate::FailureKind::Permanent);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_panic_in_blocking_code_is_the_handlers_panic() {
        let h = blocking(Sleeper);
        use futures_util::FutureExt as _;
        let caught = std::panic::AssertUnwindSafe(h.handle(&message(7)))
            .catch_unwind()
            .await
            .expect_err("the panic reaches the caller");
        assert_eq!(
            caught.downcast_ref::<String>().map(String::as_str),
            Some("event 7")
        );
    }
}
