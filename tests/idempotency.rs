//! Idempotency stores against real services: one semantic suite run against the in-memory
//! store, a Redis server, and a 3-node Redis Cluster started by the test; concurrent claims;
//! a Redis outage (kill and restart) and a paused Redis.
//!
//! Needs Redis at `REDIS_URL` (default `redis://127.0.0.1:6379/`) — `scripts/services up`
//! starts one — and `redis-server` / `redis-cli` on `PATH` for the tests that run their own.

mod support;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kourier::{
    Claim, ClaimToken, IdempotencyStore, InMemoryIdempotencyStore, RedisIdempotencyStore,
    StoreError,
};
use support::redis_server::{RedisServer, TempDir, free_port, require_binary};
use support::redis_url;

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(3600);
/// Short enough to wait out in a test, long enough that the next call lands inside it.
const SHORT: Duration = Duration::from_millis(300);
/// Comfortably past [`SHORT`].
const PAST_SHORT: Duration = Duration::from_millis(450);

// ---------------------------------------------------------------------------------------------
// The shared semantic suite
// ---------------------------------------------------------------------------------------------

async fn acquire(store: &dyn IdempotencyStore, key: &str, lease: Duration) -> ClaimToken {
    match store.claim(key, lease).await {
        Ok(Claim::Acquired(token)) => token,
        other => panic!("claim {key:?}: expected Acquired, got {other:?} ({store:?})"),
    }
}

async fn expect_claim(store: &dyn IdempotencyStore, key: &str, expected: Claim) {
    let got = store.claim(key, LEASE).await;
    assert!(
        matches!(&got, Ok(c) if *c == expected),
        "claim {key:?}: expected {expected:?}, got {got:?} ({store:?})"
    );
}

fn expect_lease_lost(result: Result<(), StoreError>, key: &str, what: &str) {
    match result {
        Err(StoreError::LeaseLost { key: k }) => assert_eq!(k, key, "{what}"),
        other => panic!("{what} on {key:?}: expected LeaseLost, got {other:?}"),
    }
}

/// What every [`IdempotencyStore`] must do. Keys are unique per store (each test gives the
/// store a fresh prefix or a fresh instance).
async fn semantics(store: Arc<dyn IdempotencyStore>) {
    let store = &*store;

    // claim → complete → done; busy while held.
    let token = acquire(store, "done", LEASE).await;
    expect_claim(store, "done", Claim::Busy).await;
    expect_claim(store, "done", Claim::Busy).await;
    store.complete("done", &token, TTL).await.unwrap();
    expect_claim(store, "done", Claim::Done).await;
    // The claim became "done": its token holds nothing any more.
    expect_lease_lost(
        store.complete("done", &token, TTL).await,
        "done",
        "second complete",
    );
    expect_lease_lost(
        store.release("done", &token).await,
        "done",
        "release after complete",
    );
    expect_claim(store, "done", Claim::Done).await;

    // A failed attempt releases: never done, a retry acquires with a new token.
    let first = acquire(store, "retry", LEASE).await;
    store.release("retry", &first).await.unwrap();
    let second = acquire(store, "retry", LEASE).await;
    assert_ne!(first, second, "a new claim gets a new token");
    expect_lease_lost(
        store.release("retry", &first).await,
        "retry",
        "stale release",
    );
    expect_lease_lost(
        store.complete("retry", &first, TTL).await,
        "retry",
        "stale complete",
    );
    expect_claim(store, "retry", Claim::Busy).await; // the second owner is untouched
    store.release("retry", &second).await.unwrap();
    let third = acquire(store, "retry", LEASE).await;
    store.complete("retry", &third, TTL).await.unwrap();
    expect_claim(store, "retry", Claim::Done).await;

    // Tokens that were never issued hold nothing.
    let _held = acquire(store, "foreign", LEASE).await;
    let forged = ClaimToken::new("forged");
    expect_lease_lost(
        store.complete("foreign", &forged, TTL).await,
        "foreign",
        "forged complete",
    );
    expect_lease_lost(
        store.release("foreign", &forged).await,
        "foreign",
        "forged release",
    );
    expect_claim(store, "foreign", Claim::Busy).await;
    expect_lease_lost(
        store.release("absent", &forged).await,
        "absent",
        "release of absent key",
    );
    expect_lease_lost(
        store.complete("absent", &forged, TTL).await,
        "absent",
        "complete of absent key",
    );
    acquire(store, "absent", LEASE).await; // and neither created anything

    // Lease expiry: another claim acquires; the old owner is fenced off. A renewed claim
    // outlives its first lease in the same wait; a forged renewal extends nothing.
    let renewed = acquire(store, "renewed", SHORT).await;
    store.renew("renewed", &renewed, LEASE).await.unwrap();
    let unrenewed = acquire(store, "unrenewed", SHORT).await;
    expect_lease_lost(
        store.renew("unrenewed", &forged, LEASE).await,
        "unrenewed",
        "forged renew",
    );
    let old = acquire(store, "lease", SHORT).await;
    let _ttl_token = {
        // Done-TTL expiry runs during the same wait.
        let t = acquire(store, "ttl", LEASE).await;
        store.complete("ttl", &t, SHORT).await.unwrap();
        expect_claim(store, "ttl", Claim::Done).await;
        t
    };
    expect_claim(store, "lease", Claim::Busy).await;
    tokio::time::sleep(PAST_SHORT).await;

    let new = acquire(store, "lease", LEASE).await;
    assert_ne!(old, new);
    expect_lease_lost(
        store.complete("lease", &old, TTL).await,
        "lease",
        "complete after lease expiry",
    );
    expect_lease_lost(
        store.release("lease", &old).await,
        "lease",
        "release after lease expiry",
    );
    expect_claim(store, "lease", Claim::Busy).await; // new owner still holds it
    store.complete("lease", &new, TTL).await.unwrap();
    expect_claim(store, "lease", Claim::Done).await;

    // Done TTL expiry: the key can be claimed again.
    acquire(store, "ttl", LEASE).await;

    expect_claim(store, "renewed", Claim::Busy).await;
    store.complete("renewed", &renewed, TTL).await.unwrap();
    acquire(store, "unrenewed", LEASE).await;
    expect_lease_lost(
        store.renew("unrenewed", &unrenewed, LEASE).await,
        "unrenewed",
        "renew after the lease ran out and the key was claimed again",
    );
}

/// Two claimers per key, released together: exactly one acquires.
async fn race(one: Arc<dyn IdempotencyStore>, two: Arc<dyn IdempotencyStore>, keys: usize) {
    let mut tasks = Vec::with_capacity(keys * 2);
    for i in 0..keys {
        let key = format!("race-{i}");
        let barrier = Arc::new(tokio::sync::Barrier::new(2));
        for store in [&one, &two] {
            let (store, key, barrier) = (Arc::clone(store), key.clone(), Arc::clone(&barrier));
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                let claim = store.claim(&key, LEASE).await;
                (key, claim)
            }));
        }
    }
    let mut acquired = std::collections::HashMap::<String, usize>::new();
    for task in tasks {
        let (key, claim) = task.await.expect("claim task panicked");
        match claim {
            Ok(Claim::Acquired(_)) => *acquired.entry(key).or_default() += 1,
            Ok(Claim::Busy) => {
                acquired.entry(key).or_default();
            }
            other => panic!("claim {key:?}: expected Acquired or Busy, got {other:?}"),
        }
    }
    assert_eq!(acquired.len(), keys);
    let wrong: Vec<_> = acquired.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        wrong.is_empty(),
        "keys not acquired exactly once: {wrong:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Service discovery (the throwaway redis-server processes live in support::redis_server)
// ---------------------------------------------------------------------------------------------

fn unique_prefix(test: &str) -> String {
    format!("kourier:test:{test}:{}:", ClaimToken::random())
}

/// A store on a throwaway `server`, with a key prefix of its own and `command_timeout` (the
/// default when `None`).
async fn store_on(
    server: &RedisServer,
    test: &str,
    command_timeout: Option<Duration>,
) -> RedisIdempotencyStore {
    let mut builder =
        RedisIdempotencyStore::builder(server.url().as_str()).key_prefix(unique_prefix(test));
    if let Some(timeout) = command_timeout {
        builder = builder.command_timeout(timeout);
    }
    builder.build().await.unwrap()
}

/// Asserts that a claim failed as the store being unavailable or timing out, within half a
/// second of the command timeout.
fn assert_claim_failed_fast(
    result: &Result<Claim, StoreError>,
    took: Duration,
    timeout: Duration,
    context: &str,
) {
    assert!(
        matches!(
            result,
            Err(StoreError::Unavailable {
                operation: "claim",
                ..
            }) | Err(StoreError::Timeout {
                operation: "claim",
                ..
            })
        ),
        "{context}: expected Unavailable or Timeout, got {result:?}"
    );
    assert!(
        took <= timeout + Duration::from_millis(500),
        "{context}: took {took:?}, command timeout {timeout:?}"
    );
}

/// A store on the shared development Redis; panics (never skips) when it is not running.
async fn shared_redis_store(test: &str) -> RedisIdempotencyStore {
    let url = redis_url();
    match RedisIdempotencyStore::builder(url.as_str())
        .key_prefix(unique_prefix(test))
        .build()
        .await
    {
        Ok(store) => store,
        Err(err) => panic!(
            "Redis is not reachable at {url} ({err}; {:?}). Start it with `scripts/services up` \
             or point REDIS_URL at a running server.",
            std::error::Error::source(&err)
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn memory_store_semantics() {
    semantics(Arc::new(InMemoryIdempotencyStore::new())).await;
}

#[tokio::test]
async fn redis_store_semantics() {
    semantics(Arc::new(shared_redis_store("semantics").await)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_two_claimers_race_one_wins() {
    let store = InMemoryIdempotencyStore::new();
    race(Arc::new(store.clone()), Arc::new(store), 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_two_claimers_race_one_wins() {
    // Two stores with their own connections, as two consumer processes would have.
    let one = shared_redis_store("race").await;
    let two = RedisIdempotencyStore::builder(redis_url().as_str())
        .key_prefix(one.key_prefix())
        .build()
        .await
        .expect("second connection");
    race(Arc::new(one), Arc::new(two), 200).await;
}

/// The value of `key` and its remaining time to live in milliseconds.
async fn value_and_pttl(raw: &mut redis::aio::MultiplexedConnection, key: &str) -> (String, i64) {
    redis::pipe()
        .get(key)
        .pttl(key)
        .query_async(raw)
        .await
        .unwrap()
}

/// The documented layout: `<prefix><key>` = `inflight:<token>` with the lease (a renewal
/// sets it again from now, same value), then `done` with the TTL.
#[tokio::test]
async fn redis_store_key_layout() {
    let store = shared_redis_store("layout").await;
    let mut raw = redis::Client::open(redis_url().as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let key = format!("{}order-1", store.key_prefix());

    let token = acquire(&store, "order-1", Duration::from_secs(60)).await;
    let (value, pttl) = value_and_pttl(&mut raw, &key).await;
    assert_eq!(value, format!("inflight:{token}"));
    assert!((50_000..=60_000).contains(&pttl), "lease pttl {pttl}");

    store
        .renew("order-1", &token, Duration::from_secs(120))
        .await
        .unwrap();
    let (value, pttl) = value_and_pttl(&mut raw, &key).await;
    assert_eq!(
        value,
        format!("inflight:{token}"),
        "a renewal keeps the claim"
    );
    assert!(
        (110_000..=120_000).contains(&pttl),
        "renewed lease pttl {pttl}"
    );

    store
        .complete("order-1", &token, Duration::from_secs(600))
        .await
        .unwrap();
    let (value, pttl) = value_and_pttl(&mut raw, &key).await;
    assert_eq!(value, "done");
    assert!((590_000..=600_000).contains(&pttl), "done pttl {pttl}");

    // A value kourier did not write is never taken for "done".
    let _: () = redis::cmd("SET")
        .arg(format!("{}foreign", store.key_prefix()))
        .arg("something else")
        .arg("PX")
        .arg(60_000)
        .query_async(&mut raw)
        .await
        .unwrap();
    expect_claim(&store, "foreign", Claim::Busy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_store_semantics() {
    require_binary("redis-server");
    require_binary("redis-cli");
    let dir = TempDir::new("cluster");
    let mut ports = Vec::new();
    let mut servers = Vec::new();
    for _ in 0..3 {
        let port = free_port(&ports);
        ports.push(port);
        let conf = format!("nodes-{port}.conf");
        servers.push(RedisServer::start(
            port,
            dir.path(),
            &[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                &conf,
                "--cluster-node-timeout",
                "5000",
            ],
        ));
    }
    let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let out = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&nodes)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .stdin(Stdio::null())
        .output()
        .expect("run redis-cli --cluster create");
    assert!(
        out.status.success(),
        "redis-cli --cluster create failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    for server in &servers {
        loop {
            let info = server.cli(&["cluster", "info"]);
            if info.contains("cluster_state:ok") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "cluster node {} not ok within 30 s:\n{info}",
                server.port
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    let urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
    let store = RedisIdempotencyStore::cluster(urls.iter().map(String::as_str))
        .key_prefix(unique_prefix("cluster"))
        .build()
        .await
        .expect("connect to the test cluster");
    semantics(Arc::new(store.clone())).await;

    // Keys spread over the nodes' slots, and every node answered.
    let mut tokens = Vec::new();
    for i in 0..60 {
        let key = format!("spread-{i}");
        let token = acquire(&store, &key, LEASE).await;
        tokens.push((key, token));
    }
    for server in &servers {
        let keys: u64 = server.cli(&["dbsize"]).trim().parse().unwrap_or(0);
        assert!(keys > 0, "node {} holds no key", server.port);
    }
    for (key, token) in &tokens {
        store.complete(key, token, TTL).await.unwrap();
        expect_claim(&store, key, Claim::Done).await;
    }

    let other = RedisIdempotencyStore::cluster(urls.iter().map(String::as_str))
        .key_prefix(store.key_prefix())
        .build()
        .await
        .expect("second cluster connection");
    race(Arc::new(store), Arc::new(other), 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_fails_fast_and_recovers() {
    let mut server = RedisServer::start_on_free_port("outage");
    let timeout = Duration::from_secs(1);
    let store = store_on(&server, "outage", Some(timeout)).await;
    let token = acquire(&store, "before", LEASE).await;
    store.complete("before", &token, TTL).await.unwrap();

    server.kill();
    for round in 0..3 {
        let started = Instant::now();
        let result = store.claim(&format!("during-{round}"), LEASE).await;
        let took = started.elapsed();
        let context = format!("round {round}, while Redis is down");
        assert_claim_failed_fast(&result, took, timeout, &context);
    }
    let release = store.release("before", &token).await;
    assert!(
        matches!(
            release,
            Err(StoreError::Unavailable { .. } | StoreError::Timeout { .. })
        ),
        "{release:?}"
    );

    // Same port, fresh (empty) server: the same store object reconnects by itself.
    server.restart();
    let started = Instant::now();
    let token = acquire(&store, "after", LEASE).await;
    assert!(
        started.elapsed() <= timeout,
        "first claim after restart took {:?}",
        started.elapsed()
    );
    store.complete("after", &token, TTL).await.unwrap();
    expect_claim(&store, "after", Claim::Done).await;
}

/// The redis crate's `ConnectionManager` fails the first command after its connection was
/// dropped (then reconnects): the store retries, so callers never see it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connection_is_retried_transparently() {
    let server = RedisServer::start_on_free_port("client-kill");
    let store = store_on(&server, "client-kill", None).await;
    for round in 0..5 {
        let key = format!("k-{round}");
        let token = acquire(&store, &key, LEASE).await;
        let killed = server.cli(&["client", "kill", "type", "normal"]);
        assert!(
            killed.trim().parse::<u32>().is_ok_and(|n| n >= 1),
            "CLIENT KILL: {killed}"
        );
        // The next operation runs on a dead connection first.
        store
            .complete(&key, &token, TTL)
            .await
            .unwrap_or_else(|e| panic!("round {round}: complete after CLIENT KILL failed: {e:?}"));
        expect_claim(&store, &key, Claim::Done).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_redis_times_out_then_recovers() {
    let server = RedisServer::start_on_free_port("pause");
    let timeout = Duration::from_millis(500);
    let store = store_on(&server, "pause", Some(timeout)).await;
    acquire(&store, "before", LEASE).await;

    let pause = Duration::from_millis(2000);
    assert_eq!(server.cli(&["client", "pause", "2000", "all"]).trim(), "OK");
    let paused_at = Instant::now();
    let started = Instant::now();
    let result = store.claim("during", LEASE).await;
    let took = started.elapsed();
    assert_claim_failed_fast(&result, took, timeout, "while Redis is paused");

    // After the pause: the same store works. ("during" may have been claimed by the late
    // script; its lease then keeps it busy, which is what a lease is for.)
    tokio::time::sleep(pause.saturating_sub(paused_at.elapsed()) + Duration::from_millis(100))
        .await;
    let token = acquire(&store, "after", LEASE).await;
    store.complete("after", &token, TTL).await.unwrap();
    expect_claim(&store, "after", Claim::Done).await;
    expect_claim(&store, "before", Claim::Busy).await;
}

// ---------------------------------------------------------------------------------------------
// The conformance suite store implementers run (feature `testing`)
// ---------------------------------------------------------------------------------------------

#[cfg(feature = "testing")]
async fn conformant(store: Arc<dyn IdempotencyStore>) {
    use kourier::idempotency::testing::{CASES, run_conformance};
    let report = run_conformance(store)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.passed(), CASES.len(), "{report}");
}

#[cfg(feature = "testing")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_passes_the_conformance_suite() {
    conformant(Arc::new(InMemoryIdempotencyStore::new())).await;
}

#[cfg(feature = "testing")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_passes_the_conformance_suite() {
    conformant(Arc::new(shared_redis_store("conformance").await)).await;
}

/// The suite finds what a store gets wrong: one that lets `complete` through for the token
/// that claimed the key last, however stale (the disagreement issue 13 reported), fails
/// exactly the cases where that token no longer holds the key.
#[cfg(feature = "testing")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_conformance_suite_catches_a_store_that_ignores_expiry_on_complete() {
    use kourier::idempotency::testing::{
        HookedStore, StoreAnswer, StoreCall, StoreHook, run_conformance,
    };

    /// Completes any key whose last claim was this token's, expired or not.
    #[derive(Debug, Default)]
    struct Lenient {
        last_token: std::sync::Mutex<std::collections::HashMap<String, ClaimToken>>,
    }

    impl StoreHook for Lenient {
        fn after(&self, call: &StoreCall<'_>, answer: StoreAnswer<'_>) {
            let mut last_token = self.last_token.lock().unwrap();
            match (*call, answer) {
                (StoreCall::Claim { key, .. }, StoreAnswer::Claim(Ok(Claim::Acquired(token)))) => {
                    last_token.insert(key.to_owned(), token.clone());
                }
                (StoreCall::Complete { key, token, .. }, StoreAnswer::TokenCall(answer))
                    if last_token.get(key) == Some(token)
                        && matches!(answer, Err(StoreError::LeaseLost { .. })) =>
                {
                    *answer = Ok(());
                }
                _ => {}
            }
        }
    }

    // Through `claim` and the lenient `complete`, one key at a time.
    let store = HookedStore::new(
        Arc::new(InMemoryIdempotencyStore::new()),
        Lenient::default(),
    )
    .one_by_one();
    let err = run_conformance(Arc::new(store))
        .await
        .expect_err("a store that ignores expiry on complete is not conformant");
    let failed: Vec<_> = err.report.failures().map(|c| c.name).collect();
    assert_eq!(
        failed,
        [
            "complete-after-expired-unclaimed-lease-is-lease-lost",
            "complete-twice-is-lease-lost",
            "complete-after-release-is-lease-lost",
        ],
        "{}",
        err.report
    );
}

/// A store that cannot renew answers `Unsupported`: it still works with the consumer (its
/// leases simply run out), but the suite fails it on exactly the renewal cases.
#[cfg(feature = "testing")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_conformance_suite_fails_a_store_that_cannot_renew_on_the_renewal_cases() {
    use kourier::idempotency::testing::{CASES, CannotRenew, HookedStore, run_conformance};

    let store = HookedStore::new(Arc::new(InMemoryIdempotencyStore::new()), CannotRenew);
    let token = acquire(&store, "k", LEASE).await;
    let answer = store.renew("k", &token, LEASE).await;
    assert!(
        matches!(answer, Err(StoreError::Unsupported { operation: "renew" })),
        "{answer:?}"
    );
    assert!(answer.unwrap_err().is_unsupported());

    let err = run_conformance(Arc::new(store))
        .await
        .expect_err("a store that cannot renew is not conformant");
    let failed: Vec<_> = err.report.failures().map(|c| c.name).collect();
    let renewal: Vec<_> = CASES
        .iter()
        .copied()
        .filter(|c| c.starts_with("renew-"))
        .collect();
    assert_eq!(renewal.len(), 5);
    assert_eq!(failed, renewal, "{}", err.report);
}

/// `calls=` of `command` in `INFO commandstats` (0 when never called).
fn command_calls(server: &RedisServer, command: &str) -> u64 {
    let stats = server.cli(&["INFO", "commandstats"]);
    stats
        .lines()
        .find_map(|line| {
            line.trim()
                .strip_prefix(&format!("cmdstat_{command}:calls="))
        })
        .and_then(|rest| rest.split(',').next())
        .and_then(|calls| calls.parse().ok())
        .unwrap_or(0)
}

/// On a single Redis 7.0+ server, claims are plain `SET … NX PX … GET` commands, a batch in
/// one pipeline — no script — with the script's answers; completions stay fenced scripts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_on_redis_7_are_plain_commands_with_the_scripts_answers() {
    let server = RedisServer::start_on_free_port("plain-claims");
    let version = server.cli(&["INFO", "server"]);
    assert!(
        version.contains("redis_version:7.") || version.contains("redis_version:8."),
        "this test expects Redis 7 or 8 (Debian's redis-server): {version}"
    );
    let store = store_on(&server, "plain-claims", None).await;
    let lease = Duration::from_secs(30);
    let keys: Vec<String> = (0..50).map(|i| format!("evt-{i}")).collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let (sets, scripts) = (
        command_calls(&server, "set"),
        command_calls(&server, "evalsha"),
    );

    let first = store.claim_many(&keys, lease).await;
    assert_eq!(
        (
            command_calls(&server, "set") - sets,
            command_calls(&server, "evalsha") - scripts
        ),
        (50, 0),
        "one plain SET per key, no script"
    );
    let tokens: Vec<ClaimToken> = first
        .into_iter()
        .map(|c| match c {
            Ok(Claim::Acquired(token)) => token,
            other => panic!("a fresh key is acquired: {other:?}"),
        })
        .collect();
    store
        .complete(keys[0], &tokens[0], Duration::from_secs(60))
        .await
        .unwrap();
    let scripts = command_calls(&server, "evalsha");
    assert!(
        scripts > 0,
        "the completion is a script (fenced by the token)"
    );
    let sets = command_calls(&server, "set");
    let again = store.claim_many(&keys[..2], lease).await;
    assert!(
        matches!(again.as_slice(), [Ok(Claim::Done), Ok(Claim::Busy)]),
        "done, then busy: {again:?}"
    );
    expect_claim(&store, keys[1], Claim::Busy).await;
    assert_eq!(
        (
            command_calls(&server, "set") - sets,
            command_calls(&server, "evalsha") - scripts
        ),
        (3, 0),
        "claims of keys done or busy are plain SETs too"
    );
    store.release(keys[1], &tokens[1]).await.unwrap();
    assert!(matches!(
        store.claim(keys[1], lease).await,
        Ok(Claim::Acquired(_))
    ));
}

/// A server that lost its scripts (restarted, or `SCRIPT FLUSH`) is sent each script again
/// when it answers `NOSCRIPT`: completions, renewals and releases, one key or a batch, keep
/// working, fenced as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_flushed_on_the_server_are_loaded_again() {
    let server = RedisServer::start_on_free_port("script-flush");
    let store = store_on(&server, "script-flush", None).await;
    let (lease, ttl) = (Duration::from_secs(30), Duration::from_secs(60));
    let keys = ["a", "b", "c", "d"];
    let mut tokens = Vec::new();
    for key in keys {
        tokens.push(acquire(&store, key, lease).await);
    }
    let flush = || assert_eq!(server.cli(&["SCRIPT", "FLUSH"]).trim(), "OK");

    flush();
    store.complete(keys[0], &tokens[0], ttl).await.unwrap();
    flush();
    let batch = store
        .complete_many(&[(keys[1], &tokens[1]), (keys[2], &tokens[2])], ttl)
        .await;
    assert!(
        batch.iter().all(Result::is_ok),
        "a batch completes after a flush: {batch:?}"
    );
    flush();
    store.renew(keys[3], &tokens[3], lease).await.unwrap();
    flush();
    store.release(keys[3], &tokens[3]).await.unwrap();
    for key in &keys[..3] {
        expect_claim(&store, key, Claim::Done).await;
    }
    assert!(matches!(
        store.claim(keys[3], lease).await,
        Ok(Claim::Acquired(_))
    ));
    flush();
    let foreign = ClaimToken::new("not-the-holder");
    assert!(
        matches!(
            store.complete(keys[3], &foreign, ttl).await,
            Err(StoreError::LeaseLost { .. })
        ),
        "still fenced by the token after a flush"
    );
}
