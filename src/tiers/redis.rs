//! The Redis key-order ledger: one hash per (group, source topic, key), each step one Lua
//! script.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::ledger::{Admission, KeyOrderLedger, LedgerKey, SourceId};
use crate::error::{ConfigError, Error, StoreError};

/// The admission rule of [`KeyOrderLedger::admit`], atomically.
///
/// KEYS[1] the key's hash (field `partition/offset` → tier); ARGV: partition, offset, tier,
/// expiry in ms. Returns `{0, tier}` to defer, `{1, tracked}` to run.
const ADMIT_LUA: &str = r"
local p = tonumber(ARGV[1])
local o = tonumber(ARGV[2])
local tier = tonumber(ARGV[3])
local me = ARGV[1] .. '/' .. ARGV[2]
local all = redis.call('HGETALL', KEYS[1])
local earlier = -1
local mine = -1
for i = 1, #all, 2 do
  local f = all[i]
  local t = tonumber(all[i + 1])
  if f == me then
    mine = t
  else
    local slash = string.find(f, '/', 1, true)
    local fp = tonumber(string.sub(f, 1, slash - 1))
    local fo = tonumber(string.sub(f, slash + 1))
    if fp < p or (fp == p and fo < o) then
      if t > earlier then earlier = t end
    end
  end
end
if earlier >= 0 then
  local target = math.max(earlier, tier, mine)
  redis.call('HSET', KEYS[1], me, target)
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  return {0, target}
end
if mine > tier then return {0, mine} end
if mine >= 0 or tier > 0 then
  redis.call('HSET', KEYS[1], me, tier)
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  return {1, 1}
end
return {1, 0}
";

/// A [`KeyOrderLedger`] in Redis, shared by every instance of a consumer group.
///
/// Layout: one hash per (group, source topic, key) at `<prefix><group>\0<topic>\0<key bytes>`,
/// field `partition/offset` of the source record, value its tier. Each operation is one
/// script or command on one key (so it runs unchanged on Redis Cluster keys, though this
/// type connects to a single server). A hash expires `expiry` (default 7 days) after its last
/// write, so a key whose records were lost from the tiers (topic retention) is released
/// eventually; make the expiry longer than a record can spend in all tiers.
#[derive(Clone)]
pub struct RedisKeyOrderLedger {
    connection: ConnectionManager,
    prefix: String,
    expiry: Duration,
    admit: Script,
}

impl fmt::Debug for RedisKeyOrderLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisKeyOrderLedger")
            .field("prefix", &self.prefix)
            .field("expiry", &self.expiry)
            .finish_non_exhaustive()
    }
}

impl RedisKeyOrderLedger {
    /// Connects to the Redis server at `url` (e.g. `redis://127.0.0.1:6379/`), with the key
    /// prefix `kourier:order:` and a 7-day expiry.
    ///
    /// # Errors
    /// [`Error::Config`] for a bad URL, [`Error::Store`]-like connection errors as
    /// [`Error::Config`] naming the failure.
    pub async fn connect(url: &str) -> Result<Self, Error> {
        let client = redis::Client::open(url)
            .map_err(|e| ConfigError::invalid("redis url", e.to_string()))?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(1);
        let connection = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| ConfigError::invalid("redis url", format!("cannot connect: {e}")))?;
        Ok(RedisKeyOrderLedger {
            connection,
            prefix: "kourier:order:".into(),
            expiry: Duration::from_secs(7 * 24 * 3600),
            admit: Script::new(ADMIT_LUA),
        })
    }

    /// Sets the key prefix.
    #[must_use]
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Sets how long a key's hash lives after its last write (default 7 days). Above one
    /// year it is taken as one year (delivery rule 17 in the crate docs): Redis refuses
    /// expiry times past what its clock holds.
    #[must_use]
    pub fn expiry(mut self, expiry: Duration) -> Self {
        self.expiry = crate::clock::bounded(expiry);
        self
    }

    /// The Redis key of a ledger key.
    pub fn redis_key(&self, key: LedgerKey<'_>) -> Vec<u8> {
        let mut k = Vec::with_capacity(
            self.prefix.len() + key.group.len() + key.topic.len() + key.key.len() + 2,
        );
        k.extend_from_slice(self.prefix.as_bytes());
        k.extend_from_slice(key.group.as_bytes());
        k.push(0);
        k.extend_from_slice(key.topic.as_bytes());
        k.push(0);
        k.extend_from_slice(key.key);
        k
    }

    fn expiry_ms(&self) -> u64 {
        u64::try_from(self.expiry.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }
}

fn unavailable(operation: &'static str) -> impl FnOnce(redis::RedisError) -> StoreError {
    move |e| StoreError::Unavailable {
        operation,
        source: Box::new(e),
    }
}

#[async_trait]
impl KeyOrderLedger for RedisKeyOrderLedger {
    async fn admit(
        &self,
        key: LedgerKey<'_>,
        record: SourceId,
        tier: u32,
    ) -> Result<Admission, StoreError> {
        let mut c = self.connection.clone();
        let (run, n): (i64, i64) = self
            .admit
            .key(self.redis_key(key))
            .arg(record.partition)
            .arg(record.offset)
            .arg(tier)
            .arg(self.expiry_ms())
            .invoke_async(&mut c)
            .await
            .map_err(unavailable("ledger admit"))?;
        Ok(if run == 1 {
            Admission::Run { tracked: n == 1 }
        } else {
            Admission::Defer(u32::try_from(n).unwrap_or(u32::MAX))
        })
    }

    async fn place(
        &self,
        key: LedgerKey<'_>,
        record: SourceId,
        tier: u32,
    ) -> Result<(), StoreError> {
        let mut c = self.connection.clone();
        redis::pipe()
            .atomic()
            .hset(self.redis_key(key), record.field(), tier)
            .ignore()
            .pexpire(
                self.redis_key(key),
                i64::try_from(self.expiry_ms()).unwrap_or(i64::MAX),
            )
            .ignore()
            .query_async::<()>(&mut c)
            .await
            .map_err(unavailable("ledger place"))
    }

    async fn settle(&self, key: LedgerKey<'_>, record: SourceId) -> Result<(), StoreError> {
        let mut c = self.connection.clone();
        redis::cmd("HDEL")
            .arg(self.redis_key(key))
            .arg(record.field())
            .query_async::<()>(&mut c)
            .await
            .map_err(unavailable("ledger settle"))
    }
}
