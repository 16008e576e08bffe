//! The smallest useful kourier consumer: a handler for JSON events with retries and a
//! dead-letter topic, shut down with Ctrl-C.
//!
//! Run it against the local broker (`scripts/services up` starts one):
//!
//! ```text
//! cargo run --example minimal -- <topic> [group]
//! ```
//!
//! Records whose `"fail"` field is `"transient"` are retried (500 ms × 3) and then
//! dead-lettered to `<topic>.dlt`; `"permanent"` ones are dead-lettered at once; values that
//! are not JSON are dead-lettered as poison pills.

use kourier::{HandlerError, Message, RetryingConsumer, handler_fn};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
struct Event {
    id: String,
    #[serde(default)]
    fail: Option<String>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kourier=info".into()),
        )
        .init();
    let mut args = std::env::args().skip(1);
    let topic = args.next().ok_or("usage: minimal <topic> [group]")?;
    let group = args.next().unwrap_or_else(|| "kourier-minimal".into());
    let bootstrap =
        std::env::var("KAFKA_BOOTSTRAP_SERVERS").unwrap_or_else(|_| "127.0.0.1:9092".into());

    let handler = handler_fn(|message: Message<Event>| async move {
        let event = message.event();
        match event.fail.as_deref() {
            Some("transient") => Err(HandlerError::transient("downstream timed out")),
            Some("permanent") => Err(HandlerError::permanent("rejected by downstream")),
            _ => {
                println!(
                    "handled {} from {}/{}@{} (attempt {})",
                    event.id,
                    message.topic(),
                    message.partition(),
                    message.offset(),
                    message.attempt()
                );
                Ok(())
            }
        }
    });

    RetryingConsumer::builder(handler)
        .bootstrap_servers(bootstrap)
        .group_id(group)
        .topic(topic)
        .build()?
        .run_until_signal()
        .await?
        // Records still running when the shutdown timeout passed are an error here.
        .into_result()?;
    Ok(())
}
