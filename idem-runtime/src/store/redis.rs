//! [`RedisStore`]: records in Redis or Redis Cluster, one Lua script per operation.
//!
//! Each record is one hash key (`prefix` + storage key) with native `PX`
//! expiry, so every script touches exactly one key and therefore one slot: the
//! store works unchanged on Redis Cluster. Claim, complete, release and renew
//! are each one script, run atomically by Redis, loaded once and invoked by
//! SHA (reloaded after a `NOSCRIPT`). Leases and expiry are judged by Redis
//! `TIME`, never the client's clock.
//!
//! Fields: `s` state (`p` processing, `c` completed, `r` released), `t` token,
//! `f` fingerprint, `o` outcome, `e` deadline in ms (lease end while
//! processing, expiry once completed). A processing or released record lives
//! `grace` past its deadline so the next claim continues its token sequence
//! (and reports a takeover); a completed record expires exactly at its ttl.
//!
//! Fencing tokens are `max(previous + 1, Redis TIME in µs)`: increasing per key,
//! and still increasing after a record has expired away entirely unless the
//! server's clock steps back.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Script, Value};

use super::{Claim, ClaimRequest, FencingToken, Record, RecordState, Store};
use crate::error::Error;
use crate::key::Digest;

/// How long a processing or released record outlives its deadline.
const DEFAULT_GRACE: Duration = Duration::from_secs(60);

const NOW: &str = r#"
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now = math.floor(now_us / 1000)
"#;

/// What is wrong with a record read by `HMGET s t f o e`, or `nil` if idem
/// could have written it (or there is none). `tonumber` alone would take
/// `nan`, `inf` and `0x..`; idem writes decimal integers only.
const VALID: &str = r#"
local function invalid(r)
  if r.err then return 'a hash' end
  if not r[1] then
    if r[2] or r[3] or r[4] or r[5] then return 'a state' end
    return nil
  end
  if r[1] ~= 'p' and r[1] ~= 'c' and r[1] ~= 'r' then return 'a state' end
  if not (r[5] and string.match(r[5], '^%-?%d+$')) then return 'a numeric deadline' end
  if not (r[2] and string.match(r[2], '^%d+$')) then return 'a numeric token' end
  if r[1] == 'c' and not r[4] then return 'an outcome on a completed record' end
  return nil
end
"#;

const CLAIM: &str = r#"
local key, fp, lease, grace = KEYS[1], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local r = redis.pcall('HMGET', key, 's', 't', 'f', 'o', 'e')
local bad = invalid(r)
if bad then return {-1, bad} end
local s = r[1]
if s and s ~= 'r' then
  local e = tonumber(r[5])
  if e > now then
    return {0, s, r[2], r[3], r[4], e - now, 0}
  end
end
local tok = string.format('%.0f', math.max((tonumber(r[2]) or 0) + 1, now_us))
redis.call('DEL', key)
if fp ~= '' then
  redis.call('HSET', key, 's', 'p', 't', tok, 'e', now + lease, 'f', fp)
else
  redis.call('HSET', key, 's', 'p', 't', tok, 'e', now + lease)
end
redis.call('PEXPIRE', key, lease + grace)
return {1, 'p', tok, false, false, lease, (s == 'p') and 1 or 0}
"#;

const HELD: &str = r#"
local r = redis.pcall('HMGET', KEYS[1], 's', 't')
if r.err or r[1] ~= 'p' or r[2] ~= ARGV[1] then return 0 end
"#;

const COMPLETE: &str = r#"
local ttl = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 's', 'c', 'o', ARGV[2], 'e', now + ttl)
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
"#;

const RENEW: &str = r#"
local lease, grace = tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'e', now + lease)
redis.call('PEXPIRE', KEYS[1], lease + grace)
return 1
"#;

const RELEASE: &str = r#"
redis.call('HSET', KEYS[1], 's', 'r', 'e', now)
redis.call('HDEL', KEYS[1], 'o', 'f')
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"#;

const GET: &str = r#"
local r = redis.pcall('HMGET', KEYS[1], 's', 't', 'f', 'o', 'e')
local bad = invalid(r)
if bad then return {-1, bad} end
if not r[1] or r[1] == 'r' then return false end
local e = tonumber(r[5])
local rem = e - now
if r[1] == 'c' and rem <= 0 then return false end
return {r[1], r[2], r[3], r[4], math.max(rem, 0)}
"#;

struct Scripts {
    claim: Script,
    complete: Script,
    renew: Script,
    release: Script,
    get: Script,
}

impl Scripts {
    fn new() -> Self {
        Scripts {
            claim: Script::new(&format!("{VALID}{NOW}{CLAIM}")),
            complete: Script::new(&format!("{HELD}{NOW}{COMPLETE}")),
            renew: Script::new(&format!("{HELD}{NOW}{RENEW}")),
            release: Script::new(&format!("{HELD}{NOW}{RELEASE}")),
            get: Script::new(&format!("{VALID}{NOW}{GET}")),
        }
    }
}

/// A single server (auto-reconnecting) or a cluster.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Idempotency records in Redis or Redis Cluster.
///
/// ```no_run
/// # async fn demo() -> Result<(), idem_runtime::Error> {
/// let store = idem_runtime::RedisStore::connect("redis://127.0.0.1:6379").await?;
/// let cluster = idem_runtime::RedisStore::connect_cluster(&[
///     "redis://127.0.0.1:7001", "redis://127.0.0.1:7002", "redis://127.0.0.1:7003",
/// ]).await?;
/// # Ok(()) }
/// ```
///
/// For payments, run Redis with `appendonly yes` and `appendfsync always` (or
/// `everysec`, accepting up to a second of lost records on a crash) and
/// `maxmemory-policy noeviction`: an evicted record is a forgotten result, and
/// the next retry runs again. See the crate's `docs/REDIS.md`.
#[derive(Clone)]
pub struct RedisStore {
    conn: Conn,
    prefix: Arc<str>,
    grace: Duration,
    scripts: Arc<Scripts>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("cluster", &matches!(self.conn, Conn::Cluster(_)))
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn store_error(err: redis::RedisError) -> Error {
    Error::store(err)
}

impl RedisStore {
    /// Connects to one server (`redis://host:port/db`), reconnecting on its own
    /// after the server goes away. A call made while it is unreachable fails
    /// with [`Error::Store`] within a few seconds instead of hanging.
    pub async fn connect(url: &str) -> Result<Self, Error> {
        let client = redis::Client::open(url).map_err(store_error)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let manager = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(store_error)?;
        Ok(Self::with_conn(Conn::Single(manager)))
    }

    /// Connects to a Redis Cluster through any of its nodes.
    pub async fn connect_cluster<S: AsRef<str>>(nodes: &[S]) -> Result<Self, Error> {
        let nodes: Vec<&str> = nodes.iter().map(AsRef::as_ref).collect();
        let client = redis::cluster::ClusterClient::builder(nodes)
            .connection_timeout(Duration::from_secs(2))
            .response_timeout(Duration::from_secs(5))
            .build()
            .map_err(store_error)?;
        let conn = client.get_async_connection().await.map_err(store_error)?;
        Ok(Self::with_conn(Conn::Cluster(conn)))
    }

    fn with_conn(conn: Conn) -> Self {
        RedisStore {
            conn,
            prefix: "idem:".into(),
            grace: DEFAULT_GRACE,
            scripts: Arc::new(Scripts::new()),
        }
    }

    /// Prefixes every Redis key with `prefix` (default `idem:`).
    pub fn with_prefix(mut self, prefix: &str) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long a processing or released record outlives its deadline, keeping
    /// its token sequence and reporting takeovers (default 60 s).
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// The Redis key a storage key lives under.
    pub fn redis_key(&self, key: &str) -> String {
        let mut k = String::with_capacity(self.prefix.len() + key.len());
        k.push_str(&self.prefix);
        k.push_str(key);
        k
    }

    async fn fenced(
        &self,
        script: &Script,
        key: &str,
        token: FencingToken,
        args: &[&[u8]],
    ) -> Result<(), Error> {
        let mut invocation = script.key(self.redis_key(key));
        invocation.arg(token.0.to_string());
        for arg in args {
            invocation.arg(*arg);
        }
        let done: i64 = invocation
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(store_error)?;
        if done == 1 {
            Ok(())
        } else {
            Err(Error::LeaseLost)
        }
    }
}

/// `d` in whole milliseconds (at least 1), capped to
/// [`MAX_DURATION`](super::MAX_DURATION).
fn ms(d: Duration) -> String {
    super::cap_duration(d).as_millis().max(1).to_string()
}

fn bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn int(v: &Value) -> Result<i64, Error> {
    match v {
        Value::Int(i) => Ok(*i),
        other => bytes(other)
            .and_then(|b| std::str::from_utf8(b).ok())
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| corrupt("a number")),
    }
}

fn corrupt(what: &str) -> Error {
    Error::codec(format!("a stored record is corrupt: expected {what}"))
}

/// The error for a reply of the wrong shape: the script's own finding (`{-1,
/// what}`, for a key that is not a hash or a record without a numeric
/// deadline), else `otherwise`.
fn corrupt_reply(reply: &[Value], otherwise: &str) -> Error {
    match reply {
        [Value::Int(-1), what] => corrupt(
            bytes(what)
                .and_then(|b| std::str::from_utf8(b).ok())
                .unwrap_or(otherwise),
        ),
        _ => corrupt(otherwise),
    }
}

fn fingerprint(v: &Value) -> Result<Option<Digest>, Error> {
    match bytes(v) {
        None => Ok(None),
        Some(b) => Ok(Some(Digest(
            b.try_into().map_err(|_| corrupt("a 32-byte fingerprint"))?,
        ))),
    }
}

fn state(v: &Value) -> Result<RecordState, Error> {
    match bytes(v) {
        Some(b"p") => Ok(RecordState::Processing),
        Some(b"c") => Ok(RecordState::Completed),
        _ => Err(corrupt("a state")),
    }
}

fn remaining(ms: i64) -> Duration {
    Duration::from_millis(ms.max(0) as u64)
}

#[async_trait]
impl Store for RedisStore {
    async fn claim(&self, request: ClaimRequest<'_>) -> Result<Claim, Error> {
        let fp: &[u8] = request.fingerprint.map_or(&[], |d| d.as_bytes());
        let reply: Vec<Value> = self
            .scripts
            .claim
            .key(self.redis_key(request.key))
            .arg(fp)
            .arg(ms(request.lease))
            .arg(ms(self.grace))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(store_error)?;
        let [acquired, st, token, stored_fp, outcome, rem, took_over] = reply.as_slice() else {
            return Err(corrupt_reply(&reply, "a claim reply of 7 fields"));
        };
        let token = FencingToken(int(token)? as u64);
        if int(acquired)? == 1 {
            return Ok(Claim::Acquired {
                token,
                took_over: int(took_over)? == 1,
            });
        }
        let stored_fp = fingerprint(stored_fp)?;
        if let (Some(stored), Some(given)) = (stored_fp, request.fingerprint) {
            if stored != *given {
                return Ok(Claim::FingerprintMismatch);
            }
        }
        match state(st)? {
            RecordState::Completed => Ok(Claim::Completed {
                outcome: bytes(outcome)
                    .ok_or_else(|| corrupt("an outcome on a completed record"))?
                    .to_vec(),
                fingerprint: stored_fp,
                expires_in: remaining(int(rem)?),
            }),
            _ => Ok(Claim::InProgress {
                lease_remaining: remaining(int(rem)?),
            }),
        }
    }

    async fn complete(
        &self,
        key: &str,
        token: FencingToken,
        outcome: &[u8],
        ttl: Duration,
    ) -> Result<(), Error> {
        let ttl = ms(ttl);
        self.fenced(
            &self.scripts.complete,
            key,
            token,
            &[outcome, ttl.as_bytes()],
        )
        .await
    }

    async fn release(&self, key: &str, token: FencingToken) -> Result<(), Error> {
        let grace = ms(self.grace);
        self.fenced(&self.scripts.release, key, token, &[grace.as_bytes()])
            .await
    }

    async fn renew(&self, key: &str, token: FencingToken, lease: Duration) -> Result<(), Error> {
        let (lease, grace) = (ms(lease), ms(self.grace));
        self.fenced(
            &self.scripts.renew,
            key,
            token,
            &[lease.as_bytes(), grace.as_bytes()],
        )
        .await
    }

    async fn get(&self, key: &str) -> Result<Option<Record>, Error> {
        let reply: Option<Vec<Value>> = self
            .scripts
            .get
            .key(self.redis_key(key))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(store_error)?;
        let Some(reply) = reply else {
            return Ok(None);
        };
        let [st, token, fp, outcome, rem] = reply.as_slice() else {
            return Err(corrupt_reply(&reply, "a record of 5 fields"));
        };
        let state = state(st)?;
        let outcome = bytes(outcome).map(<[u8]>::to_vec);
        if state == RecordState::Completed && outcome.is_none() {
            return Err(corrupt("an outcome on a completed record"));
        }
        Ok(Some(Record::new(
            key.to_owned(),
            state,
            FencingToken(int(token)? as u64),
            fingerprint(fp)?,
            outcome,
            remaining(int(rem)?),
        )))
    }

    /// Redis expires records by itself (`PX`); there is nothing to purge.
    async fn purge_expired(&self, _batch: usize) -> Result<u64, Error> {
        Ok(0)
    }

    fn handle(&self) -> Arc<dyn Store> {
        Arc::new(self.clone())
    }
}
