//! The join watch (src/consumer/poll/thread.rs) reads the group's state from the coordinator:
//! what it sees on the real broker for a group with a running member and for one without
//! members. Needs Kafka (`scripts/services up`).

mod support;

use std::time::Duration;

use kourier::rdkafka::ClientConfig;
use kourier::rdkafka::consumer::{BaseConsumer, Consumer};
use support::consumer::{self, Running, setup, wait_for};

/// (state, members) of `group` as the coordinator describes it.
async fn describe(group: &str) -> (String, usize) {
    let group = group.to_owned();
    tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", support::bootstrap())
            .set("group.id", "kourier-test-describer")
            .create()
            .expect("consumer");
        let list = c
            .fetch_group_list(Some(&group), Duration::from_secs(10))
            .expect("describe the group");
        let g = list
            .groups()
            .iter()
            .find(|g| g.name() == group)
            .expect("the group is described");
        (g.state().to_owned(), g.members().len())
    })
    .await
    .unwrap()
}

/// A group with a member is `Stable` with it; once the member left it is `Empty` with none —
/// the state the join watch takes for a lost join.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_describes_a_group_with_and_without_members() {
    let (topic, group, _) = setup("join-watch", 1).await;
    let handler = kourier::handler_fn(|_m: kourier::Message<serde_json::Value>| async { Ok(()) });
    let c = Running::start(consumer::builder(handler, &topic, &group));
    wait_for("partitions assigned", Duration::from_secs(60), || {
        !c.monitor.snapshot().assigned.is_empty()
    })
    .await;
    let (state, members) = describe(&group).await;
    assert_eq!((state.as_str(), members), ("Stable", 1));
    c.stop().await;
    let (state, members) = describe(&group).await;
    eprintln!("after the member left: {state} with {members} members");
    assert_eq!((state.as_str(), members), ("Empty", 0));
}
