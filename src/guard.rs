//! Calls into plug-ins (codec, key function, handler, store, sink) with their panics caught:
//! a panic becomes a defined failure of that plug-in (delivery rule 14 in the crate docs; the table is on the
//! worker module). Used by the engine and by the stores' default batch methods.

use std::panic::AssertUnwindSafe;

use futures_util::FutureExt as _;

use crate::error::StoreError;

/// Runs `f`, turning a panic into its message.
pub(crate) fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(|p| panic_message(&*p).to_owned())
}

/// Awaits `fut`, turning a panic into its message. Not an `async fn`: its future would hold
/// `fut` and then move it into the catching future (one copy more of every handler call).
pub(crate) fn guarded_async<F: std::future::Future>(
    fut: F,
) -> impl std::future::Future<Output = Result<F::Output, String>> {
    AssertUnwindSafe(fut)
        .catch_unwind()
        .map(|caught| caught.map_err(|p| panic_message(&*p).to_owned()))
}

/// Calls the store; a panic becomes the store error it stands for (the record waits and
/// retries, never skips).
pub(crate) async fn store_call<T>(
    operation: &'static str,
    call: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    guarded_async(call).await.unwrap_or_else(|panic| {
        Err(StoreError::Unavailable {
            operation,
            source: format!("the idempotency store panicked: {panic}").into(),
        })
    })
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("non-string panic payload")
}
