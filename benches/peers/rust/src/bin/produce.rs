//! Fills the peers benchmark's topics before any runner starts (see `scripts/peers`), or
//! deletes them afterwards.
//!
//! ```text
//! produce --bootstrap B --records N --partitions P TOPIC...   # TOPIC and TOPIC.dlt, N records
//! produce --bootstrap B --delete TOPIC...                     # deletes TOPIC and TOPIC.dlt
//! ```
//!
//! Record `seq` (0..N): key `user-<seq % 1000>`, header `event-id: evt-<seq>`, value
//! `{"id":"evt-<seq>","seq":<seq>,"user":"user-<k>","body":"..."}` padded to about 100 bytes.

use std::time::Duration;

use kourier_peers::{BoxResult, EVENT_ID_HEADER};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

/// Distinct keys (users).
const USERS: u64 = 1_000;

#[tokio::main]
async fn main() -> BoxResult<()> {
    let mut args = std::env::args().skip(1);
    let (mut bootstrap, mut records, mut partitions) = (None, 0u64, 6i32);
    let (mut delete, mut topics) = (false, Vec::new());
    while let Some(a) = args.next() {
        match a.as_str() {
            "--bootstrap" => bootstrap = args.next(),
            "--records" => records = args.next().ok_or("--records needs a value")?.parse()?,
            "--partitions" => {
                partitions = args.next().ok_or("--partitions needs a value")?.parse()?
            }
            "--delete" => delete = true,
            _ => topics.push(a),
        }
    }
    let bootstrap = bootstrap.ok_or("--bootstrap is required")?;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let all: Vec<String> = topics
        .iter()
        .flat_map(|t| [t.clone(), format!("{t}.dlt")])
        .collect();
    if delete {
        let names: Vec<&str> = all.iter().map(String::as_str).collect();
        admin.delete_topics(&names, &opts).await?;
        return Ok(());
    }
    let new: Vec<NewTopic<'_>> = all
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
        .collect();
    for result in admin.create_topics(&new, &opts).await? {
        result.map_err(|(t, e)| format!("creating topic {t}: {e}"))?;
    }
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    for topic in &topics {
        let mut pending = Vec::with_capacity(records as usize);
        for seq in 0..records {
            let user = format!("user-{}", seq % USERS);
            let id = format!("evt-{seq}");
            let value = format!(
                r#"{{"id":"{id}","seq":{seq},"user":"{user}","body":"your order has shipped, tracking to follow"}}"#
            );
            let headers = OwnedHeaders::new().insert(Header {
                key: EVENT_ID_HEADER,
                value: Some(id.as_bytes()),
            });
            let record = FutureRecord::to(topic)
                .key(&user)
                .payload(&value)
                .headers(headers);
            match producer.send_result(record) {
                Ok(delivery) => pending.push(delivery),
                Err((e, _)) => return Err(format!("producing to {topic}: {e}").into()),
            }
        }
        for delivery in pending {
            delivery
                .await
                .map_err(|_| format!("producing to {topic}: delivery canceled"))?
                .map_err(|(e, _)| format!("producing to {topic}: {e}"))?;
        }
    }
    producer.flush(Duration::from_secs(30))?;
    Ok(())
}
