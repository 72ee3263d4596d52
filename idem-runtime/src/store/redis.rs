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
//!
//! With [`RedisStore::with_replica_ack`], a completion is sent in one
//! pipeline with `WAIT` on a connection of its own (a blocked `WAIT` would hold
//! up every request behind it on a shared one, renewals included), so the
//! `WAIT` covers it. Once enough replicas acknowledge, the record gets `a`
//! ("acknowledged"). A claim or read with the option that meets a completed
//! record without `a` — whoever wrote it, with the option or without — does
//! not replay it: it writes to the record (`h`, the time) and waits for *that*
//! write in the same way; the replication stream is ordered, so a replica that
//! has the later write has the completion too. Only then is the outcome
//! answered (and `a` set), else [`Error::NotReplicated`]. A store without the
//! option ignores `a` and `h`.

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

/// The longest a `WAIT` blocks: below the connections' 5 s response timeout.
const MAX_ACK_TIMEOUT: Duration = Duration::from_secs(4);

/// How many replicas must acknowledge a completion, and for how long to wait.
#[derive(Debug, Clone, Copy)]
struct ReplicaAck {
    replicas: u32,
    timeout: Duration,
}

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

/// `ack`: `0` replays any completed record; `1` answers `2` instead of `0`
/// for one not known to be on `need` replicas (`a`, the count acknowledged,
/// below it); `2` does so and writes to it, for a `WAIT` in the same pipeline
/// to cover.
const CLAIM: &str = r#"
local key, fp, lease, grace, ack = KEYS[1], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local need = tonumber(ARGV[5])
local r = redis.pcall('HMGET', key, 's', 't', 'f', 'o', 'e', 'a')
local bad = invalid(r)
if bad then return {-1, bad} end
local s = r[1]
if s == 'c' then
  -- A completed record expires with its key (PX = its ttl): while the key
  -- lives, it is live, and PTTL is its time left. No clock needed.
  local left = redis.call('PTTL', key)
  if left ~= -2 then
    if left < 0 then left = 0 end
    if ack ~= '0' and (tonumber(r[6]) or 0) < need then
      if ack == '2' then
        local t = redis.call('TIME')
        redis.call('HSET', key, 'h', t[1] .. t[2])
      end
      return {2, s, r[2], r[3], r[4], left, 0}
    end
    return {3, r[3], r[4], left}
  end
end
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now = math.floor(now_us / 1000)
if s == 'p' then
  local e = tonumber(r[5])
  if e > now then return {0, s, r[2], r[3], r[4], e - now, 0} end
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

/// `ARGV[2]` replicas acknowledged the completion with token `ARGV[1]`:
/// record the count in `a` (the larger, if another store counted more).
const CONFIRM: &str = r#"
local r = redis.pcall('HMGET', KEYS[1], 's', 't', 'a')
if r.err or r[1] ~= 'c' or r[2] ~= ARGV[1] then return 0 end
local n = tonumber(ARGV[2])
if (tonumber(r[3]) or 0) < n then redis.call('HSET', KEYS[1], 'a', n) end
redis.call('HDEL', KEYS[1], 'h')
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

/// `ARGV[1]` and `ARGV[2]` as `ack` and `need` in [`CLAIM`]; the sixth field
/// is `1` for a completed record not known to be on `need` replicas.
const GET: &str = r#"
local r = redis.pcall('HMGET', KEYS[1], 's', 't', 'f', 'o', 'e', 'a')
local bad = invalid(r)
if bad then return {-1, bad} end
if not r[1] or r[1] == 'r' then return false end
local e = tonumber(r[5])
local rem = e - now
if r[1] == 'c' and rem <= 0 then return false end
local w = 0
if r[1] == 'c' and ARGV[1] ~= '0' and (tonumber(r[6]) or 0) < tonumber(ARGV[2]) then
  w = 1
  if ARGV[1] == '2' then redis.call('HSET', KEYS[1], 'h', now_us) end
end
return {r[1], r[2], r[3], r[4], math.max(rem, 0), w}
"#;

struct Scripts {
    claim: Script,
    complete: Script,
    renew: Script,
    release: Script,
    get: Script,
    confirm: Script,
}

impl Scripts {
    fn new() -> Self {
        Scripts {
            claim: Script::new(&format!("{VALID}{CLAIM}")),
            complete: Script::new(&format!("{HELD}{NOW}{COMPLETE}")),
            renew: Script::new(&format!("{HELD}{NOW}{RENEW}")),
            release: Script::new(&format!("{HELD}{NOW}{RELEASE}")),
            get: Script::new(&format!("{VALID}{NOW}{GET}")),
            confirm: Script::new(CONFIRM),
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

/// How to open another connection like the store's own.
#[derive(Clone)]
enum Opener {
    Single(Box<redis::Client>),
    Cluster(Box<redis::cluster::ClusterClient>),
}

impl Opener {
    async fn open(&self) -> Result<Conn, Error> {
        Ok(match self {
            Opener::Single(client) => Conn::Single(
                ConnectionManager::new_with_config((**client).clone(), manager_config())
                    .await
                    .map_err(store_error)?,
            ),
            Opener::Cluster(client) => {
                Conn::Cluster(client.get_async_connection().await.map_err(store_error)?)
            }
        })
    }
}

/// Connections for `WAIT`s, each used by one pipeline at a time: a `WAIT`
/// blocks its connection until the replicas answer, and on the store's shared
/// connection it would hold up every request behind it (renewals too, so
/// leases could lapse under a slow replica). At most [`WAIT_CONNECTIONS`]
/// are open at once, so a burst of waits for a slow replica cannot use up the
/// server's client slots.
struct WaitPool {
    opener: Opener,
    idle: std::sync::Mutex<Vec<Conn>>,
    permits: tokio::sync::Semaphore,
}

/// The most `WAIT` connections a store opens at once (and keeps idle).
const WAIT_CONNECTIONS: usize = 16;

/// A `WAIT` connection, and whether it was idle in the pool (it may have been
/// dropped by the server meanwhile) or is fresh.
struct Lent<'a> {
    conn: Conn,
    reused: bool,
    _permit: tokio::sync::SemaphorePermit<'a>,
}

impl WaitPool {
    fn new(opener: Opener) -> Self {
        WaitPool {
            opener,
            idle: std::sync::Mutex::new(Vec::new()),
            permits: tokio::sync::Semaphore::new(WAIT_CONNECTIONS),
        }
    }

    /// A connection of its own, waiting at most `patience` for one to be free.
    async fn take(&self, patience: Duration) -> Result<Lent<'_>, Error> {
        let permit = tokio::time::timeout(patience, self.permits.acquire())
            .await
            .map_err(|_| {
                Error::store(format!(
                    "all {WAIT_CONNECTIONS} connections that wait for replicas are busy"
                ))
            })?
            .map_err(Error::store)?;
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let (conn, reused) = match idle {
            Some(conn) => (conn, true),
            None => (self.opener.open().await?, false),
        };
        Ok(Lent {
            conn,
            reused,
            _permit: permit,
        })
    }

    /// Keeps a connection that answered for the next wait.
    fn put(&self, conn: Conn) {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(conn);
    }

    /// Forgets the idle connections (after one turned out dropped, the
    /// others likely are too: a server restart, an idle timeout).
    fn clear(&self) {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(5)))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500))
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
    ack: Option<ReplicaAck>,
    waits: Arc<WaitPool>,
    scripts: Arc<Scripts>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("cluster", &matches!(self.conn, Conn::Cluster(_)))
            .field("prefix", &self.prefix)
            .field("replica_ack", &self.ack)
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
        let opener = Opener::Single(Box::new(redis::Client::open(url).map_err(store_error)?));
        let conn = opener.open().await?;
        Ok(Self::with_conn(conn, opener))
    }

    /// Connects to a Redis Cluster through any of its nodes.
    pub async fn connect_cluster<S: AsRef<str>>(nodes: &[S]) -> Result<Self, Error> {
        let nodes: Vec<&str> = nodes.iter().map(AsRef::as_ref).collect();
        let client = redis::cluster::ClusterClient::builder(nodes)
            .connection_timeout(Duration::from_secs(2))
            .response_timeout(Duration::from_secs(5))
            .build()
            .map_err(store_error)?;
        let opener = Opener::Cluster(Box::new(client));
        let conn = opener.open().await?;
        Ok(Self::with_conn(conn, opener))
    }

    fn with_conn(conn: Conn, opener: Opener) -> Self {
        RedisStore {
            conn,
            prefix: "idem:".into(),
            grace: DEFAULT_GRACE,
            ack: None,
            waits: Arc::new(WaitPool::new(opener)),
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

    /// Makes completions survive a failover: each completion waits until
    /// `replicas` replicas of the key's master acknowledge it (`WAIT`), for at
    /// most `timeout` (capped at 4 s, below the connection's response timeout),
    /// before the call returns.
    ///
    /// If fewer acknowledge in time, the call fails with
    /// [`Error::NotReplicated`]: its outcome stays on the master, not marked
    /// as acknowledged, and is not run again. A duplicate that meets an outcome
    /// not marked as acknowledged (written with or without this option) waits
    /// for the replicas in the same way (through a write of its own to the
    /// record, which the replication stream orders after the outcome) and
    /// replays it only once they have it, else fails with
    /// [`Error::NotReplicated`] too. `WAIT`s go out on connections of their
    /// own, so a slow replica never holds up claims or lease renewals. So every answered outcome is on `replicas`
    /// replicas; a failover that promotes one of them keeps it. Redis elects the
    /// replica with the most data, so with `replicas` equal to the replicas per
    /// master, any promoted replica has it. A store that keeps failing fails the
    /// call instead of answering early ([`Store::answers_before_recorded`]).
    ///
    /// `replicas` = 0 turns the wait off (the default); more than the master
    /// has makes every completion fail with [`Error::NotReplicated`]. Costs a
    /// replica round trip and a script per completion, and two more round trips
    /// for a duplicate that meets an outcome not marked as acknowledged. See
    /// `docs/REDIS.md`.
    pub fn with_replica_ack(mut self, replicas: u32, timeout: Duration) -> Self {
        self.ack = (replicas > 0).then(|| ReplicaAck {
            replicas,
            timeout: timeout.clamp(Duration::from_millis(1), MAX_ACK_TIMEOUT),
        });
        self
    }

    /// The Redis key a storage key lives under.
    pub fn redis_key(&self, key: &str) -> String {
        let mut k = String::with_capacity(self.prefix.len() + key.len());
        k.push_str(&self.prefix);
        k.push_str(key);
        k
    }

    /// Runs `script` on `key` with `args`, on the store's connection.
    async fn eval<'a, T: redis::FromRedisValue>(
        &self,
        script: &Script,
        key: &str,
        args: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<T, Error> {
        let mut invocation = script.key(self.redis_key(key));
        for arg in args {
            invocation.arg(arg);
        }
        invocation
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(store_error)
    }

    async fn fenced(
        &self,
        script: &Script,
        key: &str,
        token: FencingToken,
        args: &[&[u8]],
    ) -> Result<(), Error> {
        let token = token.0.to_string();
        let all = std::iter::once(token.as_bytes()).chain(args.iter().copied());
        let done: i64 = self.eval(script, key, all).await?;
        if done == 1 {
            Ok(())
        } else {
            Err(Error::LeaseLost)
        }
    }

    /// Runs `script` on `key`, then `WAIT`, in one pipeline: both go to the
    /// key's master on one connection, so the `WAIT` covers the script's
    /// writes. Returns the script's reply and how many replicas acknowledged.
    async fn then_wait(
        &self,
        script: &Script,
        key: &str,
        args: &[&[u8]],
        ack: ReplicaAck,
    ) -> Result<(Value, u32), Error> {
        let mut pipe = redis::pipe();
        pipe.cmd("EVALSHA")
            .arg(script.get_hash())
            .arg(1)
            .arg(self.redis_key(key));
        for arg in args {
            pipe.arg(*arg);
        }
        pipe.cmd("WAIT")
            .arg(ack.replicas)
            .arg(ack.timeout.as_millis() as u64);
        let mut lent = self.waits.take(ack.timeout).await?;
        let (mut loaded, mut reopened) = (false, false);
        loop {
            let replies = pipe
                .query_async::<Vec<Value>>(&mut lent.conn)
                .await
                .and_then(|replies| match <[Value; 2]>::try_from(replies) {
                    Ok([reply, acked]) => Ok((reply.extract_error()?, acked.extract_error()?)),
                    Err(_) => Err((redis::ErrorKind::UnexpectedReturnType, "two replies").into()),
                });
            match replies {
                Ok((reply, acked)) => {
                    let acked = u32::try_from(int(&acked)?).unwrap_or(0);
                    self.waits.put(lent.conn);
                    return Ok((reply, acked));
                }
                Err(err)
                    if !loaded
                        && err.kind()
                            == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    script
                        .load_async(&mut lent.conn)
                        .await
                        .map_err(store_error)?;
                    loaded = true;
                }
                // An idle connection the server dropped meanwhile (a restart, its
                // idle timeout): once more on a new one. Running the pipeline
                // twice is safe: a completion that landed the first time is
                // refused the second (`LeaseLost`, which the engine checks with
                // `get`), and the readers' scripts change nothing but `h`.
                Err(err)
                    if lent.reused
                        && !reopened
                        && (err.is_connection_dropped()
                            || err.is_io_error()
                            || err.is_unrecoverable_error()) =>
                {
                    self.waits.clear();
                    lent.conn = self.waits.opener.open().await?;
                    reopened = true;
                }
                // The connection is not given back: a reply may still be due on it.
                Err(err) => return Err(store_error(err)),
            }
        }
    }

    /// Marks `key`'s completion with `token` as on the replicas (`a`); best
    /// effort: if it fails, the next reader waits for the replicas again.
    async fn confirm(&self, key: &str, token: FencingToken) {
        let (token, need) = (token.0.to_string(), self.need_arg());
        let cleared: Result<i64, _> = self
            .eval(
                &self.scripts.confirm,
                key,
                [token.as_bytes(), need.as_bytes()],
            )
            .await;
        if let Err(err) = cleared {
            tracing::debug!(error = %err, "could not mark a replicated completion; readers wait for the replicas again");
        }
    }

    /// The answer when only `acked` replicas acknowledged.
    fn not_replicated(ack: ReplicaAck, acked: u32) -> Error {
        Error::NotReplicated {
            acknowledged: acked,
            required: ack.replicas,
        }
    }

    /// The `ack` argument of the claim and get scripts.
    fn ack_arg(&self, touch: bool) -> &'static str {
        match (self.ack, touch) {
            (None, _) => "0",
            (Some(_), false) => "1",
            (Some(_), true) => "2",
        }
    }

    /// The `need` argument of the claim and get scripts: how many replicas
    /// must have acknowledged an outcome for it to be replayed as it is.
    fn need_arg(&self) -> std::borrow::Cow<'static, str> {
        match self.ack {
            None => "0".into(),
            Some(ack) => ack.replicas.to_string().into(),
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

/// A claim script's answer.
enum Decided {
    /// The claim, as any store answers it.
    Claim(Claim),
    /// A completed outcome that replicas have not acknowledged yet (only with
    /// [`RedisStore::with_replica_ack`]): answer it only once they have.
    Unacknowledged { token: FencingToken, claim: Claim },
}

/// Reads a claim script's reply, checking the fingerprint `given`: a replay
/// (`{3, fingerprint, outcome, time left}`, the short answer of the hot path),
/// or `{status, state, token, fingerprint, outcome, time left, took over}`.
fn decide(mut reply: Vec<Value>, given: Option<&Digest>) -> Result<Decided, Error> {
    if let [Value::Int(3), _, _, _] = reply.as_slice() {
        let rem = reply.pop().unwrap_or_default();
        let outcome = reply.pop().unwrap_or_default();
        return Ok(Decided::Claim(existing(
            RecordState::Completed,
            &reply[1],
            outcome,
            &rem,
            given,
        )?));
    }
    let [acquired, st, token, stored_fp, outcome, rem, took_over] = &mut reply[..] else {
        return Err(corrupt_reply(&reply, "a claim reply of 7 fields"));
    };
    let token = FencingToken(int(token)? as u64);
    let status = int(acquired)?;
    if status == 1 {
        return Ok(Decided::Claim(Claim::Acquired {
            token,
            took_over: int(took_over)? == 1,
        }));
    }
    let claim = existing(state(st)?, stored_fp, std::mem::take(outcome), rem, given)?;
    Ok(if status == 2 {
        Decided::Unacknowledged { token, claim }
    } else {
        Decided::Claim(claim)
    })
}

/// The claim on an existing live record in `state`: key reused if its
/// fingerprint differs from `given`, else its outcome (moved out of the reply,
/// no copy) or the time left on its lease.
fn existing(
    state: RecordState,
    stored_fp: &Value,
    outcome: Value,
    rem: &Value,
    given: Option<&Digest>,
) -> Result<Claim, Error> {
    let stored_fp = fingerprint(stored_fp)?;
    if let (Some(stored), Some(given)) = (stored_fp, given) {
        if stored != *given {
            return Ok(Claim::FingerprintMismatch);
        }
    }
    Ok(match state {
        RecordState::Completed => Claim::Completed {
            outcome: match outcome {
                Value::BulkString(b) => b,
                other => bytes(&other)
                    .ok_or_else(|| corrupt("an outcome on a completed record"))?
                    .to_vec(),
            },
            fingerprint: stored_fp,
            expires_in: remaining(int(rem)?),
        },
        _ => Claim::InProgress {
            lease_remaining: remaining(int(rem)?),
        },
    })
}

/// Reads a get script's reply: the record, and whether it is a completion
/// replicas have not acknowledged yet.
fn read_record(key: &str, reply: Option<Vec<Value>>) -> Result<Option<(Record, bool)>, Error> {
    let Some(reply) = reply else {
        return Ok(None);
    };
    let [st, token, fp, outcome, rem, unacked] = reply.as_slice() else {
        return Err(corrupt_reply(&reply, "a record of 6 fields"));
    };
    let state = state(st)?;
    let outcome = bytes(outcome).map(<[u8]>::to_vec);
    if state == RecordState::Completed && outcome.is_none() {
        return Err(corrupt("an outcome on a completed record"));
    }
    let record = Record::new(
        key.to_owned(),
        state,
        FencingToken(int(token)? as u64),
        fingerprint(fp)?,
        outcome,
        remaining(int(rem)?),
    );
    Ok(Some((record, int(unacked)? == 1)))
}

/// A script reply that is an array (or nil), as [`Script::invoke_async`] reads it.
fn array(reply: Value) -> Result<Option<Vec<Value>>, Error> {
    match reply {
        Value::Nil => Ok(None),
        Value::Array(items) => Ok(Some(items)),
        _ => Err(corrupt("an array reply")),
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn claim(&self, request: ClaimRequest<'_>) -> Result<Claim, Error> {
        let fp: &[u8] = request.fingerprint.map_or(&[], |d| d.as_bytes());
        let (lease, grace, need) = (ms(request.lease), ms(self.grace), self.need_arg());
        let mut args = [
            fp,
            lease.as_bytes(),
            grace.as_bytes(),
            self.ack_arg(false).as_bytes(),
            need.as_bytes(),
        ];
        let reply: Vec<Value> = self.eval(&self.scripts.claim, request.key, args).await?;
        let decided = decide(reply, request.fingerprint)?;
        let (Decided::Unacknowledged { .. }, Some(ack)) = (&decided, self.ack) else {
            return Ok(match decided {
                Decided::Claim(claim) | Decided::Unacknowledged { claim, .. } => claim,
            });
        };
        // Wait for the replicas to have the outcome before answering it.
        args[3] = self.ack_arg(true).as_bytes();
        let (reply, acked) = self
            .then_wait(&self.scripts.claim, request.key, &args, ack)
            .await?;
        let reply = array(reply)?.unwrap_or_default();
        match decide(reply, request.fingerprint)? {
            // Acknowledged, expired or taken meanwhile: the script's answer stands.
            Decided::Claim(claim) => Ok(claim),
            Decided::Unacknowledged { token, claim } if acked >= ack.replicas => {
                self.confirm(request.key, token).await;
                Ok(claim)
            }
            Decided::Unacknowledged { .. } => Err(Self::not_replicated(ack, acked)),
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
        let Some(ack) = self.ack else {
            return self
                .fenced(
                    &self.scripts.complete,
                    key,
                    token,
                    &[outcome, ttl.as_bytes()],
                )
                .await;
        };
        let token_arg = token.0.to_string();
        let args = [token_arg.as_bytes(), outcome, ttl.as_bytes()];
        let (done, acked) = self
            .then_wait(&self.scripts.complete, key, &args, ack)
            .await?;
        if int(&done)? != 1 {
            return Err(Error::LeaseLost);
        }
        if acked < ack.replicas {
            return Err(Self::not_replicated(ack, acked));
        }
        self.confirm(key, token).await;
        Ok(())
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
        let need = self.need_arg();
        let mut args = [self.ack_arg(false).as_bytes(), need.as_bytes()];
        let reply: Option<Vec<Value>> = self.eval(&self.scripts.get, key, args).await?;
        let read = read_record(key, reply)?;
        let (Some((_, true)), Some(ack)) = (&read, self.ack) else {
            return Ok(read.map(|(record, _)| record));
        };
        args[0] = self.ack_arg(true).as_bytes();
        let (reply, acked) = self.then_wait(&self.scripts.get, key, &args, ack).await?;
        match read_record(key, array(reply)?)? {
            Some((record, true)) if acked >= ack.replicas => {
                self.confirm(key, record.token).await;
                Ok(Some(record))
            }
            Some((_, true)) => Err(Self::not_replicated(ack, acked)),
            read => Ok(read.map(|(record, _)| record)),
        }
    }

    /// Redis expires records by itself (`PX`); there is nothing to purge.
    async fn purge_expired(&self, _batch: usize) -> Result<u64, Error> {
        Ok(0)
    }

    fn handle(&self) -> Arc<dyn Store> {
        Arc::new(self.clone())
    }

    fn answers_before_recorded(&self) -> bool {
        self.ack.is_none()
    }
}
