//! Redis idempotency store: one key per dedup key, each state change one command — a plain
//! `SET … NX … GET` for claims on a single Redis 7.0+ server, a Lua script otherwise
//! ([`ClaimForm`]).
//!
//! Layout: `<prefix><key>` holds `inflight:<token>` while claimed (with the lease as its
//! expiry) and `done` once completed (with the TTL as its expiry). Every operation touches
//! exactly one key, so the scripts run unchanged on Redis Cluster.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{
    Cmd, ConnectionInfo, FromRedisValue, IntoConnectionInfo, RedisError, RedisWrite, RetryMethod,
    Script, ServerErrorKind, ToRedisArgs,
};

use super::{Claim, ClaimToken, IdempotencyStore, StoreError};
use crate::error::{ConfigError, Error};
use crate::retry::infra_backoff;

/// `SET NX PX`, and when the key exists, say what it holds: one round trip, atomic.
///
/// KEYS[1] the key; ARGV[1] `inflight:<token>`; ARGV[2] the lease in ms.
/// Returns 1 acquired, 2 done, 3 busy. A key already holding *this* token is ours: the call
/// is a retry whose first reply was lost, so it answers "acquired" again.
const CLAIM_LUA: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
local v = redis.call('GET', KEYS[1])
if v == 'done' then return 2 end
if v == ARGV[1] then return 1 end
return 3
";

/// Compare-and-set `inflight:<token>` → `done`.
///
/// KEYS[1] the key; ARGV[1] `inflight:<token>`; ARGV[2] the TTL in ms.
/// Returns 1 completed, 2 already done, 0 not held by this token.
const COMPLETE_LUA: &str = r"
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then
  redis.call('SET', KEYS[1], 'done', 'PX', ARGV[2])
  return 1
end
if v == 'done' then return 2 end
return 0
";

/// Compare-and-delete `inflight:<token>`.
///
/// KEYS[1] the key; ARGV[1] `inflight:<token>`.
/// Returns 1 released, 2 the key is absent, 0 held by something else.
const RELEASE_LUA: &str = r"
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
if not v then return 2 end
return 0
";

/// Compare-and-`PEXPIRE` `inflight:<token>`.
///
/// KEYS[1] the key; ARGV[1] `inflight:<token>`; ARGV[2] the lease in ms.
/// Returns 1 renewed, 0 not held by this token. Repeating it is harmless, so a retry whose
/// first reply was lost answers "renewed" again while the claim is still ours.
const RENEW_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";

/// [`CLAIM_LUA`] over many keys, for a batch on a single server: one round trip.
///
/// KEYS[i] a key; ARGV[i] its `inflight:<token>`; ARGV[#KEYS + 1] the lease in ms.
/// Returns one answer per key, as [`CLAIM_LUA`]'s, each key claimed on its own.
const CLAIM_MANY_LUA: &str = include_str!("lua/claim_many.lua");

/// [`COMPLETE_LUA`] over many keys, for a batch on a single server: one round trip, each
/// key fenced by its own token.
///
/// KEYS[i] a key; ARGV[i] its `inflight:<token>`; ARGV[#KEYS + 1] the TTL in ms.
/// Returns one answer per key, as [`COMPLETE_LUA`]'s.
const COMPLETE_MANY_LUA: &str = include_str!("lua/complete_many.lua");

/// Redis caps expiries near `i64::MAX` ms from now; 100 years is plenty for a lease or TTL.
const MAX_EXPIRY_MS: u64 = 100 * 365 * 86_400 * 1000;

/// An [`IdempotencyStore`] in Redis (a single server, or a Redis Cluster).
///
/// Each dedup key is one Redis string, `<prefix><key>`: `inflight:<token>` while a worker
/// holds the claim (expiring with the lease), `done` once completed (expiring with the TTL).
/// Every operation is **one command on one key** (a plain command or a Lua script), so each
/// answer is atomic and a round trip:
///
/// - `claim`: `SET key inflight:<token> NX PX lease GET`; if the key exists, what it holds
///   answers [`Claim::Done`] or [`Claim::Busy`]. Any value kourier did not write counts as
///   busy (never skipped). On a single server of Redis 7.0 or later (found with `INFO server`
///   when the store connects) that is the plain command, and a batch of claims is one
///   pipeline; on a cluster, on older servers (`NX` and `GET` could not be combined before
///   7.0) or when `INFO` is refused, a Lua script gives the same answers.
/// - `complete`: compare-and-set: only if the key still holds this claim's token does it
///   become `done` for the TTL; otherwise [`StoreError::LeaseLost`].
/// - `release`: compare-and-delete: only this claim's token is deleted; otherwise
///   [`StoreError::LeaseLost`].
/// - `renew`: compare-and-`PEXPIRE`: only if the key still holds this claim's token does its
///   expiry become the new lease from now; otherwise [`StoreError::LeaseLost`].
///
/// Leases and TTLs are rounded up to whole milliseconds (at least 1 ms).
///
/// # Failures and retries
///
/// A single server is reached through [`redis::aio::ConnectionManager`], which reconnects in
/// the background but fails the first command after the connection dropped. So each operation
/// is tried up to [`max_attempts`](RedisIdempotencyStoreBuilder::max_attempts) times (3 by
/// default) when the error is a connection or timeout error, with a short back-off, all within
/// [`command_timeout`](RedisIdempotencyStoreBuilder::command_timeout) (2 s by default). Then it
/// returns [`StoreError::Unavailable`] (the last error, naming the key, in `source()`) or
/// [`StoreError::Timeout`]; it never hangs past the timeout and never panics. Server errors
/// that retrying cannot fix are returned at once as [`StoreError::Unavailable`].
///
/// Retrying is safe because every script is idempotent for the same call: a repeated `claim`
/// finds its own token and answers acquired; a repeated `renew` renews again; a repeated
/// `complete` that finds `done`, or a repeated `release` that finds the key gone, reports
/// success (the first attempt may have done it; either way the key ends as the caller asked:
/// done, or free for a retry). On a first attempt those two cases are
/// [`StoreError::LeaseLost`].
///
/// The store is cheap to clone; clones share the connection.
///
/// # Example
///
/// ```no_run
/// use std::sync::Arc;
/// use std::time::Duration;
/// use kourier::{IdempotencyStore, RedisIdempotencyStore};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> kourier::Result<()> {
/// let store = RedisIdempotencyStore::builder("redis://127.0.0.1:6379/")
///     .key_prefix("billing:idem:")
///     .command_timeout(Duration::from_secs(1))
///     .build()
///     .await?;
/// let store: Arc<dyn IdempotencyStore> = Arc::new(store);
///
/// // Redis Cluster: any reachable nodes; the client discovers the rest.
/// let cluster = RedisIdempotencyStore::cluster([
///     "redis://10.0.0.1:6379/",
///     "redis://10.0.0.2:6379/",
/// ])
/// .build()
/// .await?;
/// # let _ = (store, cluster);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisIdempotencyStore {
    connection: Connection,
    /// How claims are made: see [`ClaimForm`].
    claim_form: ClaimForm,
    scripts: Arc<Scripts>,
    key_prefix: String,
    command_timeout: Duration,
    max_attempts: u32,
}

impl RedisIdempotencyStore {
    /// The default key prefix, `kourier:idem:`.
    pub const DEFAULT_KEY_PREFIX: &'static str = "kourier:idem:";
    /// The default time budget of one operation, retries included: 2 s.
    pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
    /// The default number of tries of one operation, the first included: 3.
    pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;

    /// A builder for a store on a single Redis server (or a replica set's primary).
    ///
    /// `connection` is anything the redis crate can turn into a connection target: a URL such
    /// as `"redis://127.0.0.1:6379/"` or `"redis://:password@host:6379/2"`, a
    /// [`redis::ConnectionInfo`], or `("host", port)`. An invalid URL is reported by
    /// [`build`](RedisIdempotencyStoreBuilder::build). To start from a [`redis::Client`] use
    /// [`from_client`](Self::from_client).
    pub fn builder(connection: impl IntoConnectionInfo) -> RedisIdempotencyStoreBuilder {
        RedisIdempotencyStoreBuilder::new(Target::Single(
            connection
                .into_connection_info()
                .and_then(redis::Client::open),
        ))
    }

    /// A builder for a store on a single Redis server, from a configured [`redis::Client`].
    pub fn from_client(client: redis::Client) -> RedisIdempotencyStoreBuilder {
        RedisIdempotencyStoreBuilder::new(Target::Single(Ok(client)))
    }

    /// A builder for a store on a Redis Cluster, through the redis crate's `cluster_async`
    /// client.
    ///
    /// `nodes` are some of the cluster's nodes (URLs or [`redis::ConnectionInfo`]s); the client
    /// discovers the others and follows slot moves. Each dedup key is one Redis key, so every
    /// script runs on the one node owning that key's slot.
    pub fn cluster<T: IntoConnectionInfo>(
        nodes: impl IntoIterator<Item = T>,
    ) -> RedisIdempotencyStoreBuilder {
        RedisIdempotencyStoreBuilder::new(Target::Cluster(
            nodes
                .into_iter()
                .map(IntoConnectionInfo::into_connection_info)
                .collect(),
        ))
    }

    /// The prefix put before every dedup key.
    pub fn key_prefix(&self) -> &str {
        &self.key_prefix
    }

    /// [`run`](Self::run) with the two arguments most scripts take: the claim's value (its
    /// token) and a duration in milliseconds (the lease or the TTL).
    async fn run_token(
        &self,
        operation: &'static str,
        key: &str,
        script: &Script,
        token: &ClaimToken,
        duration: Duration,
    ) -> Result<(i64, u32), StoreError> {
        let duration = millis(duration);
        self.run(operation, key, script, |cmd| {
            cmd.arg(inflight(token)).arg(duration);
        })
        .await
    }

    /// Runs one script on `<prefix><key>` (`key` unprefixed) with the arguments `args`
    /// writes, with retries, all within the command timeout. Returns the script's answer and
    /// the attempt (1-based) that produced it.
    async fn run(
        &self,
        operation: &'static str,
        key: &str,
        script: &Script,
        args: impl Fn(&mut Cmd),
    ) -> Result<(i64, u32), StoreError> {
        let attempts = async {
            let mut attempt = 1;
            loop {
                let mut cmd = script_cmd(script, 1, 4);
                cmd.arg(Joined(&self.key_prefix, key));
                args(&mut cmd);
                let result: redis::RedisResult<i64> = match &self.connection {
                    Connection::Single(manager) => eval(&cmd, script, &mut manager.clone()).await,
                    Connection::Cluster(cluster) => eval(&cmd, script, &mut cluster.clone()).await,
                };
                match result {
                    Ok(answer) => return Ok((answer, attempt)),
                    Err(error) if attempt < self.max_attempts && is_retryable(&error) => {
                        tracing::debug!(
                            operation,
                            key,
                            attempt,
                            error = %error,
                            "redis idempotency store command failed; retrying"
                        );
                        tokio::time::sleep(retry_delay(attempt)).await;
                        attempt += 1;
                    }
                    Err(error) => {
                        tracing::warn!(
                            operation,
                            key,
                            attempt,
                            error = %error,
                            "redis idempotency store unavailable"
                        );
                        return Err(StoreError::Unavailable {
                            operation,
                            source: Box::new(CommandError {
                                key: key.to_owned(),
                                source: error,
                            }),
                        });
                    }
                }
            }
        };
        match tokio::time::timeout(self.command_timeout, attempts).await {
            Ok(result) => result,
            Err(_) => {
                tracing::warn!(
                    operation,
                    key,
                    after = ?self.command_timeout,
                    "redis idempotency store timed out"
                );
                Err(StoreError::Timeout {
                    operation,
                    after: self.command_timeout,
                })
            }
        }
    }
}

impl RedisIdempotencyStore {
    /// Runs one many-key script on a single server (`keys` unprefixed, `per_key[i]` the
    /// argument of `keys[i]`, then `last`) with retries, within the command timeout. Returns
    /// the answers and the attempt that produced them. On failure, the error for every key.
    async fn run_many(
        &self,
        operation: &'static str,
        manager: &ConnectionManager,
        script: &Script,
        keys: &[&str],
        per_key: &[&ClaimToken],
        last: u64,
    ) -> Result<(Vec<i64>, u32), StoreError> {
        self.retried_batch(operation, keys, || {
            let mut cmd = script_cmd(script, keys.len(), 2 * keys.len() + 1);
            for key in keys {
                cmd.arg(Joined(&self.key_prefix, key));
            }
            for token in per_key {
                cmd.arg(inflight(token));
            }
            cmd.arg(last);
            let mut connection = manager.clone();
            async move { eval(&cmd, script, &mut connection).await }
        })
        .await
    }

    /// Claims `keys` on a single server with one pipeline of plain `SET key value NX PX
    /// lease GET` commands (Redis 7.0 or later: see [`ClaimForm::Plain`]), one answer per key,
    /// each exactly what [`CLAIM_LUA`] answers for it.
    async fn claim_plain(
        &self,
        manager: &ConnectionManager,
        keys: &[&str],
        lease: Duration,
    ) -> Vec<Result<Claim, StoreError>> {
        let tokens: Vec<ClaimToken> = keys.iter().map(|_| ClaimToken::random()).collect();
        let lease = millis(lease);
        let answers = self
            .retried_batch("claim", keys, || {
                let mut pipe = redis::Pipeline::with_capacity(keys.len());
                for (key, token) in keys.iter().zip(&tokens) {
                    // Sized for the command: its arguments and their bytes, with room for
                    // the lease's digits (no buffer grown on the way).
                    let bytes = self.key_prefix.len() + key.len() + INFLIGHT.len() + 32 + 32;
                    let mut set = Cmd::with_capacity(7, bytes);
                    set.arg("SET")
                        .arg(Joined(&self.key_prefix, key))
                        .arg(inflight(token))
                        .arg("NX")
                        .arg("PX")
                        .arg(lease)
                        .arg("GET");
                    pipe.add_command(set);
                }
                let mut connection = manager.clone();
                let tokens = &tokens;
                async move {
                    let held: Vec<Option<Vec<u8>>> = pipe.query_async(&mut connection).await?;
                    Ok(held
                        .iter()
                        .zip(tokens)
                        .map(|(held, token)| plain_claim_answer(held.as_deref(), token))
                        .collect())
                }
            })
            .await;
        claims_answered(answers, tokens)
    }

    /// Runs `call` (one round trip answering one number per key of `keys`, unprefixed) with
    /// retries, within the command timeout. Returns the answers and the attempt that
    /// produced them. On failure, the error for every key.
    async fn retried_batch<F, Fut>(
        &self,
        operation: &'static str,
        keys: &[&str],
        call: F,
    ) -> Result<(Vec<i64>, u32), StoreError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<Vec<i64>>>,
    {
        let attempts = async {
            let mut attempt = 1;
            loop {
                match call().await {
                    Ok(answers) if answers.len() == keys.len() => return Ok((answers, attempt)),
                    Ok(answers) => {
                        return Err(batch_size_error(operation, answers.len(), keys.len()));
                    }
                    Err(error) if attempt < self.max_attempts && is_retryable(&error) => {
                        tracing::debug!(operation, keys = keys.len(), attempt, error = %error, "redis idempotency store batch failed; retrying");
                        tokio::time::sleep(retry_delay(attempt)).await;
                        attempt += 1;
                    }
                    Err(error) => {
                        tracing::warn!(operation, keys = keys.len(), attempt, error = %error, "redis idempotency store unavailable");
                        return Err(StoreError::Unavailable {
                            operation,
                            source: Box::new(CommandError {
                                key: format!(
                                    "{} (and {} more)",
                                    keys.first().unwrap_or(&""),
                                    keys.len().saturating_sub(1)
                                ),
                                source: error,
                            }),
                        });
                    }
                }
            }
        };
        match tokio::time::timeout(self.command_timeout, attempts).await {
            Ok(result) => result,
            Err(_) => {
                tracing::warn!(operation, keys = keys.len(), after = ?self.command_timeout, "redis idempotency store timed out");
                Err(StoreError::Timeout {
                    operation,
                    after: self.command_timeout,
                })
            }
        }
    }
}

/// The same error for each of `n` keys of a failed batch.
fn each(n: usize, error: &StoreError) -> Vec<StoreError> {
    (0..n)
        .map(|_| match error {
            StoreError::Timeout { operation, after } => StoreError::Timeout {
                operation,
                after: *after,
            },
            StoreError::Unavailable { operation, source } => StoreError::Unavailable {
                operation,
                source: crate::error::error_chain(&**source).into(),
            },
            other => StoreError::Unavailable {
                operation: "batch",
                source: other.to_string().into(),
            },
        })
        .collect()
}

impl fmt::Debug for RedisIdempotencyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisIdempotencyStore")
            .field(
                "mode",
                match self.connection {
                    Connection::Single(_) => &"single",
                    Connection::Cluster(_) => &"cluster",
                },
            )
            .field("claim_form", &self.claim_form)
            .field("key_prefix", &self.key_prefix)
            .field("command_timeout", &self.command_timeout)
            .field("max_attempts", &self.max_attempts)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl IdempotencyStore for RedisIdempotencyStore {
    async fn claim(&self, key: &str, lease: Duration) -> Result<Claim, StoreError> {
        if let (ClaimForm::Plain, Connection::Single(manager)) = (self.claim_form, &self.connection)
        {
            let mut answers = self.claim_plain(manager, &[key], lease).await;
            return answers
                .pop()
                .unwrap_or_else(|| Err(batch_size_error("claim", 0, 1)));
        }
        let token = ClaimToken::random();
        let script = &self.scripts.claim;
        let (answer, _) = self.run_token("claim", key, script, &token, lease).await?;
        Ok(claimed(answer, token))
    }

    async fn complete(
        &self,
        key: &str,
        token: &ClaimToken,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let script = &self.scripts.complete;
        let (answer, attempt) = self.run_token("complete", key, script, token, ttl).await?;
        fenced(answer, attempt, key)
    }

    async fn release(&self, key: &str, token: &ClaimToken) -> Result<(), StoreError> {
        let (answer, attempt) = self
            .run("release", key, &self.scripts.release, |cmd| {
                cmd.arg(inflight(token));
            })
            .await?;
        fenced(answer, attempt, key)
    }

    /// One round trip on a single server: a pipeline of plain claims (Redis 7.0 or later),
    /// else one script over all the keys; on a cluster, where keys live in different slots,
    /// one script per key, all at once.
    async fn claim_many(&self, keys: &[&str], lease: Duration) -> Vec<Result<Claim, StoreError>> {
        let manager = match &self.connection {
            Connection::Single(manager) if self.claim_form == ClaimForm::Plain => {
                return self.claim_plain(manager, keys, lease).await;
            }
            Connection::Single(manager) if keys.len() > 1 => manager,
            _ => {
                return futures_util::future::join_all(keys.iter().map(|k| self.claim(k, lease)))
                    .await;
            }
        };
        let tokens: Vec<ClaimToken> = keys.iter().map(|_| ClaimToken::random()).collect();
        let values: Vec<&ClaimToken> = tokens.iter().collect();
        let script = &self.scripts.claim_many;
        let answers = self
            .run_many("claim", manager, script, keys, &values, millis(lease))
            .await;
        claims_answered(answers, tokens)
    }

    /// As [`claim_many`](Self::claim_many): one round trip on a single server, fenced per
    /// key exactly as [`complete`](IdempotencyStore::complete).
    async fn complete_many(
        &self,
        claims: &[(&str, &ClaimToken)],
        ttl: Duration,
    ) -> Vec<Result<(), StoreError>> {
        let manager = match &self.connection {
            Connection::Single(manager) if claims.len() > 1 => manager,
            _ => {
                return futures_util::future::join_all(
                    claims.iter().map(|(k, t)| self.complete(k, t, ttl)),
                )
                .await;
            }
        };
        let keys: Vec<&str> = claims.iter().map(|(k, _)| *k).collect();
        let values: Vec<&ClaimToken> = claims.iter().map(|(_, t)| *t).collect();
        let script = &self.scripts.complete_many;
        match self
            .run_many("complete", manager, script, &keys, &values, millis(ttl))
            .await
        {
            Ok((answers, attempt)) => answers
                .into_iter()
                .zip(keys)
                .map(|(answer, key)| fenced(answer, attempt, key))
                .collect(),
            Err(error) => each(claims.len(), &error).into_iter().map(Err).collect(),
        }
    }

    async fn renew(
        &self,
        key: &str,
        token: &ClaimToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let script = &self.scripts.renew;
        let (answer, _) = self.run_token("renew", key, script, token, lease).await?;
        // Only the first attempt's answer counts: a renewal is never "done already".
        fenced(answer, 1, key)
    }
}

/// A batch of claims' answers, one per token (the key's own), or the batch's error for each.
fn claims_answered(
    answers: Result<(Vec<i64>, u32), StoreError>,
    tokens: Vec<ClaimToken>,
) -> Vec<Result<Claim, StoreError>> {
    match answers {
        Ok((answers, _)) => answers
            .into_iter()
            .zip(tokens)
            .map(|(answer, token)| Ok(claimed(answer, token)))
            .collect(),
        Err(error) => {
            let n = tokens.len();
            each(n, &error).into_iter().map(Err).collect()
        }
    }
}

/// What a claim script answered: 1 acquired (with `token`), 2 done, else busy.
fn claimed(answer: i64, token: ClaimToken) -> Claim {
    match answer {
        1 => Claim::Acquired(token),
        2 => Claim::Done,
        _ => Claim::Busy,
    }
}

/// What a script fenced by the claim's token answered: 1 done; 2 (done or gone already) is
/// a success only after a failed first attempt of this call, which may have made the
/// change; anything else: the claim is not the token's any more.
fn fenced(answer: i64, attempt: u32, key: &str) -> Result<(), StoreError> {
    match answer {
        1 => Ok(()),
        2 if attempt > 1 => Ok(()),
        _ => Err(StoreError::LeaseLost {
            key: key.to_owned(),
        }),
    }
}

/// Configures and connects a [`RedisIdempotencyStore`]; made by
/// [`RedisIdempotencyStore::builder`], [`RedisIdempotencyStore::from_client`] or
/// [`RedisIdempotencyStore::cluster`].
#[must_use = "a builder does nothing until `build()` is awaited"]
pub struct RedisIdempotencyStoreBuilder {
    target: Target,
    key_prefix: String,
    command_timeout: Duration,
    max_attempts: u32,
}

impl RedisIdempotencyStoreBuilder {
    fn new(target: Target) -> Self {
        RedisIdempotencyStoreBuilder {
            target,
            key_prefix: RedisIdempotencyStore::DEFAULT_KEY_PREFIX.to_owned(),
            command_timeout: RedisIdempotencyStore::DEFAULT_COMMAND_TIMEOUT,
            max_attempts: RedisIdempotencyStore::DEFAULT_MAX_ATTEMPTS,
        }
    }

    /// The prefix put before every dedup key (default
    /// [`DEFAULT_KEY_PREFIX`](RedisIdempotencyStore::DEFAULT_KEY_PREFIX), `kourier:idem:`).
    ///
    /// The consumer scopes the keys it passes to the store by its consumer group, so with the
    /// default prefix two groups handling the same events keep separate dedup records. Set a
    /// prefix per application or environment when several share one Redis. It may be empty.
    /// In a Redis Cluster, a hash tag here (`{app}:idem:`) would put every key in one slot: leave
    /// braces out unless that is what you want.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// The time budget of one operation, retries included (default 2 s); also the time
    /// [`build`](Self::build) may take to connect. Past it, operations return
    /// [`StoreError::Timeout`]. Zero is refused by `build`; above one year it is taken as one
    /// year (delivery rule 17 in the crate docs).
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = crate::clock::bounded(timeout);
        self
    }

    /// How many times one operation is tried, the first included (default 3), when it fails
    /// with a connection or timeout error. `1` disables retrying.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// Validates the settings and connects.
    ///
    /// # Errors
    /// - [`Error::Config`] for an invalid URL or node, no cluster node, a zero command
    ///   timeout or zero attempts.
    /// - [`Error::Store`] with [`StoreError::Unavailable`] (operation `connect`) when Redis
    ///   cannot be reached or refuses the connection (e.g. a wrong password), or
    ///   [`StoreError::Timeout`] when connecting takes longer than the command timeout.
    pub async fn build(self) -> Result<RedisIdempotencyStore, Error> {
        if self.command_timeout.is_zero() {
            return Err(
                ConfigError::invalid("command_timeout", "must be greater than zero").into(),
            );
        }
        if self.max_attempts == 0 {
            return Err(ConfigError::invalid("max_attempts", "must be at least 1").into());
        }
        let timeout = self.command_timeout;
        let connect = async {
            match self.target {
                Target::Single(client) => {
                    let client =
                        client.map_err(|e| ConfigError::invalid("redis url", e.to_string()))?;
                    let config = ConnectionManagerConfig::new()
                        .set_response_timeout(Some(timeout))
                        .set_connection_timeout(Some(timeout))
                        // Fail fast while Redis is down: the store retries on its own terms
                        // and each failure starts a fresh reconnection.
                        .set_number_of_retries(1)
                        .set_min_delay(Duration::from_millis(50))
                        .set_max_delay(Duration::from_millis(500));
                    let manager = ConnectionManager::new_with_config(client, config)
                        .await
                        .map_err(connect_error)?;
                    Ok::<_, Error>(Connection::Single(manager))
                }
                Target::Cluster(nodes) => {
                    let nodes = nodes
                        .into_iter()
                        .collect::<Result<Vec<ConnectionInfo>, _>>()
                        .map_err(|e| ConfigError::invalid("redis cluster nodes", e.to_string()))?;
                    if nodes.is_empty() {
                        return Err(ConfigError::Missing("redis cluster nodes").into());
                    }
                    let client = ClusterClient::builder(nodes)
                        .connection_timeout(timeout)
                        .response_timeout(timeout)
                        .build()
                        .map_err(|e| ConfigError::invalid("redis cluster nodes", e.to_string()))?;
                    let connection = client.get_async_connection().await.map_err(connect_error)?;
                    Ok(Connection::Cluster(connection))
                }
            }
        };
        let connection = tokio::time::timeout(timeout, connect).await.map_err(|_| {
            Error::Store(StoreError::Timeout {
                operation: "connect",
                after: timeout,
            })
        })??;
        let claim_form = ClaimForm::of(&connection).await;
        tracing::debug!(?claim_form, "redis idempotency store connected");
        Ok(RedisIdempotencyStore {
            connection,
            claim_form,
            scripts: Arc::new(Scripts::new()),
            key_prefix: self.key_prefix,
            command_timeout: self.command_timeout,
            max_attempts: self.max_attempts,
        })
    }
}

impl fmt::Debug for RedisIdempotencyStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Addresses only: connection infos can carry passwords.
        let target = match &self.target {
            Target::Single(Ok(client)) => format!("single {}", client.get_connection_info().addr()),
            Target::Single(Err(_)) => "single <invalid url>".to_owned(),
            Target::Cluster(nodes) => {
                let nodes: Vec<String> = nodes
                    .iter()
                    .map(|n| match n {
                        Ok(info) => info.addr().to_string(),
                        Err(_) => "<invalid url>".to_owned(),
                    })
                    .collect();
                format!("cluster [{}]", nodes.join(", "))
            }
        };
        f.debug_struct("RedisIdempotencyStoreBuilder")
            .field("target", &target)
            .field("key_prefix", &self.key_prefix)
            .field("command_timeout", &self.command_timeout)
            .field("max_attempts", &self.max_attempts)
            .finish()
    }
}

enum Target {
    Single(redis::RedisResult<redis::Client>),
    Cluster(Vec<redis::RedisResult<ConnectionInfo>>),
}

#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// How a store makes claims.
///
/// Every claim needs the same three answers (acquired, done, busy) in one atomic step.
/// Redis 7.0 added `SET … NX … GET` (before 7.0, `NX` and `GET` could not be combined), which
/// gives them without a script: the key is set only when absent, and the reply is the value it
/// held (none: acquired; `done`: done; this claim's own value: a retry whose first reply was
/// lost, acquired; anything else: busy) — exactly [`CLAIM_LUA`]'s answers. The plain command
/// costs the server a fraction of a script call, and a batch of them goes in one pipeline.
///
/// Completions, releases and renewals stay scripts: they change a key only while it holds
/// this claim's token (compare-and-set), which Redis has no single command for before 8.4's
/// `SET … IFEQ` (Debian 12's `redis-server` is 7.0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClaimForm {
    /// `SET key value NX PX lease GET`, pipelined: a single server on Redis 7.0 or later.
    Plain,
    /// [`CLAIM_LUA`] / [`CLAIM_MANY_LUA`]: a cluster, an older server, or one whose version
    /// could not be read (`INFO` refused).
    Script,
}

impl ClaimForm {
    /// The form `connection` takes: plain on a single server that says it is Redis 7.0 or
    /// later (`redis_version` in `INFO server`; Valkey answers the same).
    async fn of(connection: &Connection) -> ClaimForm {
        let Connection::Single(manager) = connection else {
            return ClaimForm::Script;
        };
        let info: redis::RedisResult<String> = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut manager.clone())
            .await;
        match info.ok().as_deref().and_then(server_major_version) {
            Some(major) if major >= 7 => ClaimForm::Plain,
            _ => ClaimForm::Script,
        }
    }
}

/// The major version in an `INFO server` reply (`redis_version:7.0.15`).
fn server_major_version(info: &str) -> Option<u32> {
    info.lines()
        .find_map(|line| line.trim().strip_prefix("redis_version:"))
        .and_then(|version| version.split('.').next())
        .and_then(|major| major.parse().ok())
}

/// What a plain claim's reply means, as [`CLAIM_LUA`] answers it: 1 acquired, 2 done, 3 busy.
/// `held` is what the key held before (`None`: it was absent, and is set now).
fn plain_claim_answer(held: Option<&[u8]>, token: &ClaimToken) -> i64 {
    match held {
        None => 1,
        Some(b"done") => 2,
        Some(held) if held.strip_prefix(INFLIGHT.as_bytes()) == Some(token.as_str().as_bytes()) => {
            1
        }
        Some(_) => 3,
    }
}

/// A batch answered with another number of replies than it had keys.
fn batch_size_error(operation: &'static str, answers: usize, keys: usize) -> StoreError {
    StoreError::Unavailable {
        operation,
        source: format!("redis answered {answers} results for a batch of {keys} keys").into(),
    }
}

struct Scripts {
    claim: Script,
    complete: Script,
    release: Script,
    renew: Script,
    claim_many: Script,
    complete_many: Script,
}

impl Scripts {
    fn new() -> Self {
        Scripts {
            claim: Script::new(CLAIM_LUA),
            complete: Script::new(COMPLETE_LUA),
            release: Script::new(RELEASE_LUA),
            renew: Script::new(RENEW_LUA),
            claim_many: Script::new(CLAIM_MANY_LUA),
            complete_many: Script::new(COMPLETE_MANY_LUA),
        }
    }
}

/// A failed Redis command, naming the dedup key (never a value).
#[derive(Debug, thiserror::Error)]
#[error("redis command failed for key {key:?}")]
struct CommandError {
    key: String,
    #[source]
    source: RedisError,
}

fn connect_error(error: RedisError) -> Error {
    Error::Store(StoreError::Unavailable {
        operation: "connect",
        source: Box::new(error),
    })
}

/// What a held claim's value starts with, before its token.
const INFLIGHT: &str = "inflight:";

/// A held claim's value: `inflight:` and the claim's token.
fn inflight(token: &ClaimToken) -> Joined<'_> {
    Joined(INFLIGHT, token.as_str())
}

/// Two strings as one Redis argument, written straight into the command's buffer (the key
/// prefix and a key, or `inflight:` and a token): no string is built for it.
struct Joined<'a>(&'a str, &'a str);

impl ToRedisArgs for Joined<'_> {
    fn write_redis_args<W: ?Sized + RedisWrite>(&self, out: &mut W) {
        use std::io::Write as _;
        let mut arg = out.writer_for_next_arg();
        // Writing to a command's buffer (or a vector) cannot fail.
        let _ = arg.write_all(self.0.as_bytes());
        let _ = arg.write_all(self.1.as_bytes());
    }
}

/// An `EVALSHA` of `script` over `keys` keys, sized for them and `args` more arguments; the
/// caller adds the keys, then the arguments.
fn script_cmd(script: &Script, keys: usize, args: usize) -> Cmd {
    // Room for the name, the hash, the key count and about 48 bytes per argument.
    let mut cmd = Cmd::with_capacity(3 + keys + args, 64 + 48 * (keys + args));
    cmd.arg("EVALSHA").arg(script.get_hash()).arg(keys);
    cmd
}

/// Runs `cmd` (made by [`script_cmd`]); a server that does not have the script yet (a new
/// or restarted server) is sent it first and asked again, as `ScriptInvocation` does.
async fn eval<T, C>(cmd: &Cmd, script: &Script, connection: &mut C) -> redis::RedisResult<T>
where
    T: FromRedisValue,
    C: redis::aio::ConnectionLike,
{
    match cmd.query_async(connection).await {
        Err(error) if error.kind() == redis::ErrorKind::Server(ServerErrorKind::NoScript) => {
            script.load_async(connection).await?;
            cmd.query_async(connection).await
        }
        answer => answer,
    }
}

/// Whole milliseconds, rounded up, within what Redis accepts for `PX`.
fn millis(d: Duration) -> u64 {
    let ms = d.as_nanos().div_ceil(1_000_000);
    u64::try_from(ms)
        .unwrap_or(u64::MAX)
        .clamp(1, MAX_EXPIRY_MS)
}

/// Errors a new attempt can fix: the connection dropped or was refused, a reply timed out,
/// or the server asks to try again (loading, busy script, cluster slot moves).
fn is_retryable(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
        || !matches!(error.retry_method(), RetryMethod::NoRetry)
}

/// 25 ms, 50 ms, 100 ms, ... up to 400 ms, with up to 50 % jitter.
/// Pause before attempt `attempt + 1`: 25 ms doubling to 400 ms, with jitter.
fn retry_delay(attempt: u32) -> Duration {
    infra_backoff(
        Duration::from_millis(25),
        Duration::from_millis(400),
        attempt.saturating_sub(1),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_version_is_read_from_info() {
        let info = "# Server\r\nredis_version:7.0.15\r\nredis_mode:standalone\r\n";
        assert_eq!(server_major_version(info), Some(7));
        assert_eq!(server_major_version("redis_version:6.2.14\r\n"), Some(6));
        assert_eq!(server_major_version("redis_version:10.1.0"), Some(10));
        assert_eq!(
            server_major_version("# Server\r\nredis_mode:standalone"),
            None
        );
        assert_eq!(server_major_version("redis_version:x.1"), None);
    }

    #[test]
    fn a_plain_claim_answers_as_the_claim_script() {
        let ours = ClaimToken::new("abc");
        assert_eq!(
            plain_claim_answer(None, &ours),
            1,
            "absent: set now, acquired"
        );
        assert_eq!(plain_claim_answer(Some(b"done"), &ours), 2, "done");
        assert_eq!(
            plain_claim_answer(Some(b"inflight:abc"), &ours),
            1,
            "our own value: a retry whose first reply was lost"
        );
        assert_eq!(plain_claim_answer(Some(b"inflight:xyz"), &ours), 3, "busy");
        assert_eq!(
            plain_claim_answer(Some(b"inflight:abcd"), &ours),
            3,
            "a longer token is another's"
        );
        assert_eq!(plain_claim_answer(Some(b"abc"), &ours), 3, "no prefix");
        assert_eq!(
            plain_claim_answer(Some(b"DONE"), &ours),
            3,
            "a foreign value is busy"
        );
        assert_eq!(plain_claim_answer(Some(b""), &ours), 3);
    }

    #[test]
    fn a_joined_argument_is_one_argument_of_both_parts() {
        let mut cmd = Cmd::new();
        cmd.arg("GET")
            .arg(Joined("prefix:", "key"))
            .arg(inflight(&ClaimToken::new("t")));
        assert_eq!(
            String::from_utf8(cmd.get_packed_command()).unwrap(),
            "*3\r\n$3\r\nGET\r\n$10\r\nprefix:key\r\n$10\r\ninflight:t\r\n"
        );
    }

    #[test]
    fn millis_round_up_and_clamp() {
        assert_eq!(millis(Duration::ZERO), 1);
        assert_eq!(millis(Duration::from_micros(1)), 1);
        assert_eq!(millis(Duration::from_micros(1500)), 2);
        assert_eq!(millis(Duration::from_secs(30)), 30_000);
        assert_eq!(millis(Duration::MAX), MAX_EXPIRY_MS);
    }

    #[test]
    fn retry_delays_are_short_and_bounded() {
        for attempt in 1..20 {
            let d = retry_delay(attempt);
            assert!(d <= Duration::from_millis(400), "{attempt}: {d:?}");
        }
        assert!(retry_delay(1) <= Duration::from_millis(25));
    }

    async fn build_error(builder: RedisIdempotencyStoreBuilder) -> Error {
        builder.build().await.expect_err("build() should fail")
    }

    #[tokio::test]
    async fn build_rejects_bad_settings_without_connecting() {
        // Port 1 on loopback: nothing listens there, but the settings are refused first.
        let refused = "redis://127.0.0.1:1/";
        for (builder, refused_setting) in [
            (RedisIdempotencyStore::builder("not a url"), "redis url"),
            (
                RedisIdempotencyStore::builder(refused).command_timeout(Duration::ZERO),
                "command_timeout",
            ),
            (
                RedisIdempotencyStore::builder(refused).max_attempts(0),
                "max_attempts",
            ),
        ] {
            let err = build_error(builder).await;
            assert!(
                matches!(
                    err,
                    Error::Config(ConfigError::Invalid { setting, .. }) if setting == refused_setting
                ),
                "{err:?}"
            );
        }

        let err = build_error(RedisIdempotencyStore::cluster(Vec::<String>::new())).await;
        assert!(
            matches!(
                err,
                Error::Config(ConfigError::Missing("redis cluster nodes"))
            ),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn build_reports_an_unreachable_server_as_unavailable() {
        // Port 1 on loopback: nothing listens there, the connection is refused at once.
        let b = RedisIdempotencyStore::builder("redis://127.0.0.1:1/");
        let err = build_error(b.command_timeout(Duration::from_secs(5))).await;
        assert!(
            matches!(
                err,
                Error::Store(StoreError::Unavailable {
                    operation: "connect",
                    ..
                }) | Error::Store(StoreError::Timeout {
                    operation: "connect",
                    ..
                })
            ),
            "{err:?}"
        );
    }

    #[test]
    fn builder_debug_hides_passwords() {
        let builder = RedisIdempotencyStore::builder("redis://:s3cret@127.0.0.1:6379/");
        let shown = format!("{builder:?}");
        assert!(shown.contains("127.0.0.1:6379"), "{shown}");
        assert!(!shown.contains("s3cret"), "{shown}");
        let cluster = RedisIdempotencyStore::cluster(["redis://:s3cret@127.0.0.1:7000/", "bad"]);
        let shown = format!("{cluster:?}");
        assert!(
            shown.contains("127.0.0.1:7000") && !shown.contains("s3cret"),
            "{shown}"
        );
    }
}
