//! [`RedisStore`]: records in Redis or Redis Cluster, one Lua script per operation.
//!
//! Each record is one string key (`prefix` + storage key) with native `PX`
//! expiry, so every script touches exactly one key and therefore one slot: the
//! store works unchanged on Redis Cluster. Claim, complete, release and renew
//! are each one script, run atomically by Redis, loaded once and invoked by
//! SHA (reloaded after a `NOSCRIPT`). Leases and expiry are judged by Redis
//! `TIME`, never the client's clock.
//!
//! A record is one string, a fixed 39-byte header then the rest:
//!
//! | bytes | what |
//! |---|---|
//! | 0 | state: `p` processing, `c` completed, `r` released |
//! | 1 | replicas known to hold a completion (one byte; see below) |
//! | 2 | touch byte, changed by a reader that waits for replicas |
//! | 3–22 | fencing token, 20 decimal digits |
//! | 23–37 | grace in ms, 15 digits, while processing: the lease ends this long before the key expires (judged by `PTTL`, Redis's clock); zeros otherwise |
//! | 38 | `f` then a 32-byte fingerprint, or `-` for none |
//! | rest | the outcome, on a completed record; on a processing or released one, its steps: `s`, 15 digits of the time they are kept until (ms, Redis's clock), then per step 10 digits of position, 10 of id length, the id, 10 of value length, the value (a later entry for a position replaces an earlier one) |
//!
//! A processing record lives `grace` past its lease and a released one
//! `grace` past its release, so the next claim continues its token sequence
//! (and reports a takeover); a completed record expires exactly at its ttl.
//! No script but a claim that makes a token reads the clock (`TIME`): key
//! expiry, Redis's own clock, decides the rest. A replay — the hot path — is
//! one `GET` and one `PTTL` inside the claim script, answered as one string
//! (`<time left> <record>`) that the client reads; one string per record
//! also keeps small records compact (no hash encoding to outgrow).
//!
//! Steps ([`Store::record_step`]) live in the record too: one key per call,
//! so one slot. They are kept until a time by Redis's clock (`TIME`, read only
//! by scripts that meet steps), and the key lives at least that long:
//! recording one stretches the key's expiry and its grace by as much, so the
//! lease (expiry minus grace) does not move; a release keeps the record (`r`,
//! with its fingerprint and steps) until then; a claim carries kept steps of
//! a lapsed or released record over (and says `t`, a takeover); a completion
//! drops them.
//!
//! Fencing tokens are `max(previous + 1, Redis TIME in µs)`: increasing per key,
//! and still increasing after a record has expired away entirely unless the
//! server's clock steps back.
//!
//! With [`RedisStore::with_replica_ack`], a completion is sent in one
//! pipeline with `WAIT` on a connection of its own (a blocked `WAIT` would hold
//! up every request behind it on a shared one, renewals included), so the
//! `WAIT` covers it. Once enough replicas acknowledge, the record's second
//! byte holds their count. A claim or read with the option that meets a
//! completed record with a smaller count — whoever wrote it, with the option
//! or without — does not replay it: it writes to the record (the touch byte)
//! and waits for *that* write in the same way; the replication stream is
//! ordered, so a replica that has the later write has the completion too.
//! Only then is the outcome answered (and the count set), else
//! [`Error::NotReplicated`]. A store without the option ignores both bytes.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Script, Value};

use super::{Claim, ClaimRequest, FencingToken, Record, RecordState, Step, Store};
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

/// The record layout (one string per key; see the module docs): state, the
/// replica count, the touch byte, 20 token digits, 15 grace digits, then
/// the fingerprint flag.
const HEADER: usize = 39;
/// Where the token starts (0-based), and its digits.
const TOKEN_AT: usize = 3;
const TOKEN_DIGITS: usize = 20;
/// Where the grace starts, and its digits.
const GRACE_AT: usize = 23;
const GRACE_DIGITS: usize = 15;
/// The largest token a record may hold: the scripts count in Lua's doubles,
/// where above 2^53 a token + 1 is the token again. (Tokens are Redis's time
/// in µs: 2^53 µs is the year 2255.) A larger one is a corrupt record, to the
/// scripts and to the client alike.
const MAX_TOKEN: u64 = 9_007_199_254_740_990;
/// The fingerprint flag: `f` followed by 32 bytes, or `-`.
const FLAG_AT: usize = 38;
const FINGERPRINT: usize = 32;

/// What is wrong with a record read by `GET`, or `nil` if idem could have
/// written it. Digits only: `tonumber` alone would take `nan`, `inf` and
/// `0x..`. Completed records on the replay path skip this: the client reads
/// them (`Stored::parse`).
const VALID: &str = r#"
local function invalid(v)
  if #v < 39 then return 'a record header' end
  local s = string.byte(v)
  if s ~= 112 and s ~= 99 and s ~= 114 then return 'a state' end
  if not string.match(string.sub(v, 4, 38), '^%d+$') then return 'a numeric token and grace' end
  -- Lua counts in doubles: above 2^53 a token + 1 is the token again.
  if tonumber(string.sub(v, 4, 23)) > 9007199254740990 then return 'a token below 2^53' end
  local f = string.byte(v, 39)
  local len = 39
  if f == 102 then len = 71 elseif f ~= 45 then return 'a fingerprint flag' end
  if #v < len or (s ~= 99 and #v ~= len and string.byte(v, len + 1) ~= 115) then return 'a record of its length' end
  return nil
end
"#;

/// `ARGV[1]`, the replica mode: `0` replays any completed record; `n`
/// answers `{2, record, time left}` instead for one not known to be on `n`
/// replicas (its second byte below `n`); `n!` does so and writes to it (the
/// touch byte), for a `WAIT` in the same pipeline to cover. `ARGV[2]`:
/// `<lease ms> <grace ms, 15 digits>`; `ARGV[3]`: the fingerprint, if any.
/// (Few arguments: each costs Redis a Lua string on every call, replays
/// included.)
///
/// The hot paths answer one bulk string: a replay (one `GET`, one `PTTL`)
/// `<time left> <record>`; a claim `a<token>`, or `t<token>` when it took
/// over a lapsed one. A new key's token is Redis's `TIME` in µs, written as
/// digits without arithmetic. A processing record's lease ends `grace` (its
/// own, in the record) before its key expires, so it is judged by `PTTL`.
const CLAIM: &str = r#"
local key, mode = KEYS[1], ARGV[1]
local v = redis.pcall('GET', key)
if type(v) == 'table' then return {-1, 'a string record'} end
local s = v and string.byte(v)
if s == 99 and #v >= 39 then
  -- A completed record expires with its key (PX = its ttl): while the key
  -- lives, it is live, and PTTL is its time left. No clock needed.
  if mode == '0' or string.byte(v, 2) >= tonumber(string.match(mode, '%d+')) then
    return redis.call('PTTL', key) .. ' ' .. v
  end
  if string.byte(mode, -1) == 33 then
    redis.call('SETRANGE', key, 2, string.char((string.byte(v, 3) + 1) % 256))
  end
  return {2, v, redis.call('PTTL', key)}
end
local bad = v and invalid(v)
if bad then return {-1, bad} end
local prev, keep, tail, t = -1, 0, '', nil
if v then
  if s == 112 then
    local pttl = redis.call('PTTL', key)
    -- idem always sets an expiry; without one (PERSIST) the lease is unknown.
    if pttl < 0 then return {-1, 'an expiry on a processing record'} end
    local left = pttl - tonumber(string.sub(v, 24, 38))
    -- The header and fingerprint only: never the steps, however large.
    if left > 0 then return {0, string.sub(v, 1, (string.byte(v, 39) == 102) and 71 or 39), left} end
  end
  local body = 39
  if string.byte(v, 39) == 102 then body = 71 end
  if #v > body then
    t = redis.call('TIME')
    keep = (tonumber(string.sub(v, body + 2, body + 16)) or 0) - (tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
    if keep > 0 then
      -- Kept steps, carried over; another request's are not resumed.
      if ARGV[3] and body == 71 and string.sub(v, 40, 71) ~= ARGV[3] then return {0, string.sub(v, 1, body), 0} end
      tail = string.sub(v, body + 1)
    end
  end
  prev = tonumber(string.sub(v, 4, 23))
end
t = t or redis.call('TIME')
local tok
if prev < 0 and #t[1] == 10 then
  tok = '0000' .. t[1] .. string.sub('00000' .. t[2], -6)
else
  tok = string.format('%020.0f', math.max(prev + 1, tonumber(t[1]) * 1000000 + tonumber(t[2])))
end
local grace = string.sub(ARGV[2], -15)
local lease = tonumber(string.sub(ARGV[2], 1, -17))
local px = lease + tonumber(grace)
-- Carried steps keep the key alive as long as they had to be: the grace
-- grows by as much, so the lease does not.
if keep > px and #tail > 0 then
  grace = string.format('%015.0f', keep - lease)
  px = keep
end
local rec = 'p\0\0' .. tok .. grace
if ARGV[3] then rec = rec .. 'f' .. ARGV[3] else rec = rec .. '-' end
redis.call('SET', key, rec .. tail, 'PX', px)
if s == 112 or #tail > 0 then return 't' .. tok end
return 'a' .. tok
"#;

/// Binds `v`, the record's first 87 bytes (the header, a fingerprint, the
/// steps' `s` and kept-until: never a record's steps, however large), if it
/// is processing with token `ARGV[1]` (20 digits).
const HELD: &str = r#"
local v = redis.pcall('GETRANGE', KEYS[1], 0, 86)
if type(v) ~= 'string' or string.byte(v) ~= 112 or string.sub(v, 4, 23) ~= ARGV[1] then return 0 end
"#;

/// The completed record keeps the token and fingerprint (not the steps),
/// gets the outcome `ARGV[2]`, and lives `ARGV[3]` ms (its key's expiry).
const COMPLETE: &str = r#"
local body = 39
if string.byte(v, 39) == 102 then body = 71 end
redis.call('SET', KEYS[1], 'c\0\0' .. string.sub(v, 4, 23) .. '000000000000000' .. string.sub(v, 39, body) .. ARGV[2], 'PX', ARGV[3])
return 1
"#;

/// `ARGV[2]` replicas acknowledged the completion with token `ARGV[1]`:
/// record the count in the second byte (the larger, if another store
/// counted more).
const CONFIRM: &str = r#"
local v = redis.pcall('GET', KEYS[1])
if type(v) ~= 'string' or #v < 39 or string.byte(v) ~= 99 or string.sub(v, 4, 23) ~= ARGV[1] then return 0 end
local n = tonumber(ARGV[2])
if string.byte(v, 2) < n then redis.call('SETRANGE', KEYS[1], 1, string.char(n)) end
return 1
"#;

/// The lease is renewed to `ARGV[2]` ms; the key lives the record's grace
/// beyond.
const RENEW: &str = r#"
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) + tonumber(string.sub(v, 24, 38)))
return 1
"#;

/// The released record keeps only its token, for the next claim to continue,
/// for `ARGV[2]` ms; with kept steps, also its fingerprint and steps, for as
/// long as they are kept if that is longer.
const RELEASE: &str = r#"
local body = 39
if string.byte(v, 39) == 102 then body = 71 end
if redis.call('STRLEN', KEYS[1]) > body then
  local t = redis.call('TIME')
  local keep = (tonumber(string.sub(v, body + 2, body + 16)) or 0) - (tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
  if keep > 0 then
    -- In place: the steps are not copied.
    redis.call('SETRANGE', KEYS[1], 0, 'r')
    redis.call('SETRANGE', KEYS[1], 23, '000000000000000')
    redis.call('PEXPIRE', KEYS[1], math.max(keep, tonumber(ARGV[2])))
    return 1
  end
end
redis.call('SET', KEYS[1], 'r\0\0' .. string.sub(v, 4, 23) .. '000000000000000-', 'PX', ARGV[2])
return 1
"#;

/// Appends step `ARGV[2]` (an encoded entry) to the record; the steps are
/// kept at least `ARGV[3]` ms from now, and the key lives as long, its grace
/// stretched by as much (the lease stays).
const RECORD_STEP: &str = r#"
local pttl = redis.call('PTTL', KEYS[1])
if pttl < 0 then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local until_ = now + tonumber(ARGV[3])
local body = 39
if string.byte(v, 39) == 102 then body = 71 end
-- In place (the steps recorded before are not copied): the kept-until, the
-- grace, then the entry appended.
if redis.call('STRLEN', KEYS[1]) > body then
  until_ = math.max(until_, tonumber(string.sub(v, body + 2, body + 16)) or 0)
  redis.call('SETRANGE', KEYS[1], body + 1, string.format('%015.0f', until_))
else
  redis.call('APPEND', KEYS[1], 's' .. string.format('%015.0f', until_))
end
if until_ - now > pttl then
  local grace = tonumber(string.sub(v, 24, 38)) + (until_ - now) - pttl
  redis.call('SETRANGE', KEYS[1], 23, string.format('%015.0f', grace))
  redis.call('PEXPIRE', KEYS[1], until_ - now)
end
redis.call('APPEND', KEYS[1], ARGV[2])
return 1
"#;

/// The steps of record `KEYS[1]` (`s`, until, entries) while they are kept
/// (by Redis's clock), else nil; with `ARGV[1]` (a token), `-2` unless the
/// record is processing with that token.
const STEPS: &str = r#"
local v = redis.pcall('GET', KEYS[1])
if ARGV[1] and (type(v) ~= 'string' or #v < 39 or string.byte(v) ~= 112 or string.sub(v, 4, 23) ~= ARGV[1]) then return -2 end
if type(v) ~= 'string' or #v < 39 or string.byte(v) == 99 then return false end
local body = 39
if string.byte(v, 39) == 102 then body = 71 end
if #v <= body then return false end
local t = redis.call('TIME')
local u = tonumber(string.sub(v, body + 2, body + 16))
if u and u <= tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) then return false end
return string.sub(v, body + 1)
"#;

/// `{record, PTTL, unacknowledged}`, or nil; `ARGV[1]` the replica mode of
/// [`CLAIM`]; `unacknowledged` is `1` for a completed record not known to be
/// on that many replicas.
const GET: &str = r#"
local v = redis.pcall('GET', KEYS[1])
if type(v) == 'table' then return {-1, 'a string record'} end
if not v then return false end
local w, mode = 0, ARGV[1]
if #v >= 39 and string.byte(v) == 99 and mode ~= '0' and string.byte(v, 2) < tonumber(string.match(mode, '%d+')) then
  w = 1
  if string.byte(mode, -1) == 33 then
    redis.call('SETRANGE', KEYS[1], 2, string.char((string.byte(v, 3) + 1) % 256))
  end
end
-- A record's steps are not sent (a tail that is not steps is, to be reported).
if string.byte(v) ~= 99 then
  local body = (string.byte(v, 39) == 102) and 71 or 39
  if string.byte(v, body + 1) == 115 then v = string.sub(v, 1, body) end
end
return {v, redis.call('PTTL', KEYS[1]), w}
"#;

struct Scripts {
    claim: Script,
    complete: Script,
    renew: Script,
    release: Script,
    get: Script,
    confirm: Script,
    record_step: Script,
    steps: Script,
}

impl Scripts {
    fn new() -> Self {
        Scripts {
            claim: Script::new(&format!("{VALID}{CLAIM}")),
            complete: Script::new(&format!("{HELD}{COMPLETE}")),
            renew: Script::new(&format!("{HELD}{RENEW}")),
            release: Script::new(&format!("{HELD}{RELEASE}")),
            get: Script::new(GET),
            confirm: Script::new(CONFIRM),
            record_step: Script::new(&format!("{HELD}{RECORD_STEP}")),
            steps: Script::new(STEPS),
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
    /// has makes every completion fail with [`Error::NotReplicated`]; above
    /// 255 counts as 255 (the record keeps the count in one byte). Costs a
    /// replica round trip and a script per completion, and two more round trips
    /// for a duplicate that meets an outcome not marked as acknowledged. See
    /// `docs/REDIS.md`.
    pub fn with_replica_ack(mut self, replicas: u32, timeout: Duration) -> Self {
        self.ack = (replicas > 0).then(|| ReplicaAck {
            replicas: replicas.min(255),
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

    /// Runs `script` on `key` with `args`, on the store's connection: one
    /// `EVALSHA` built in place (no per-argument copies), loaded and sent
    /// again after a `NOSCRIPT`.
    async fn eval<'a, T: redis::FromRedisValue>(
        &self,
        script: &Script,
        key: &str,
        args: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<T, Error> {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(script.get_hash()).arg(1).arg(self.redis_key(key));
        for arg in args {
            cmd.arg(arg);
        }
        let mut conn = self.conn.clone();
        match cmd.query_async(&mut conn).await {
            Err(err)
                if err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
            {
                script.load_async(&mut conn).await.map_err(store_error)?;
                cmd.query_async(&mut conn).await
            }
            done => done,
        }
        .map_err(store_error)
    }

    async fn fenced(
        &self,
        script: &Script,
        key: &str,
        token: FencingToken,
        args: &[&[u8]],
    ) -> Result<(), Error> {
        let token = token_arg(token);
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
    async fn then_wait<'a>(
        &self,
        script: &Script,
        key: &str,
        args: impl IntoIterator<Item = &'a [u8]>,
        ack: ReplicaAck,
    ) -> Result<(Value, u32), Error> {
        let mut pipe = redis::pipe();
        pipe.cmd("EVALSHA")
            .arg(script.get_hash())
            .arg(1)
            .arg(self.redis_key(key));
        for arg in args {
            pipe.arg(arg);
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
        let (token, need) = (token_arg(token), self.mode_arg(false));
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

    /// The replica mode argument of the claim and get scripts: `0` without
    /// the option, else how many replicas must have acknowledged an outcome
    /// for it to be replayed as it is, with `!` when the script should also
    /// write to (touch) a record that is not known to be on them.
    fn mode_arg(&self, touch: bool) -> std::borrow::Cow<'static, str> {
        match (self.ack, touch) {
            (None, _) => "0".into(),
            (Some(ack), false) => ack.replicas.to_string().into(),
            (Some(ack), true) => format!("{}!", ack.replicas).into(),
        }
    }
}

/// The claim script's arguments: the replica mode, `lease grace`, the
/// fingerprint if any.
fn claim_args<'a>(
    mode: &'a str,
    times: &'a str,
    fp: Option<&'a [u8]>,
) -> impl Iterator<Item = &'a [u8]> {
    [mode.as_bytes(), times.as_bytes()].into_iter().chain(fp)
}

/// `d` in whole milliseconds (at least 1), capped to
/// [`MAX_DURATION`](super::MAX_DURATION).
fn ms(d: Duration) -> u128 {
    super::cap_duration(d).as_millis().max(1)
}

/// A token as the record holds it: 20 digits.
fn token_arg(token: FencingToken) -> String {
    format!("{:0width$}", token.0, width = TOKEN_DIGITS)
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
/// what}`, for a key that is not a string or a record it cannot read), else
/// `otherwise`.
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

/// Decimal digits only (what idem writes), as a number.
fn digits(b: &[u8]) -> Option<u64> {
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(b).ok()?.parse().ok()
}

/// A record's header, read from its bytes (the layout in the module docs).
#[derive(Debug)]
struct Stored {
    state: u8,
    token: FencingToken,
    /// A processing record's grace in ms (its lease ends this long before its key expires).
    grace: i64,
    fingerprint: Option<Digest>,
    /// Where the outcome starts (the end, for records without one).
    body: usize,
}

impl Stored {
    fn parse(v: &[u8]) -> Result<Stored, Error> {
        if v.len() < HEADER {
            return Err(corrupt("a record header"));
        }
        let state = v[0];
        if !matches!(state, b'p' | b'c' | b'r') {
            return Err(corrupt("a state"));
        }
        let token = digits(&v[TOKEN_AT..TOKEN_AT + TOKEN_DIGITS])
            .ok_or_else(|| corrupt("a numeric token"))?;
        if token > MAX_TOKEN {
            return Err(corrupt("a token below 2^53"));
        }
        let grace = digits(&v[GRACE_AT..GRACE_AT + GRACE_DIGITS])
            .and_then(|g| i64::try_from(g).ok())
            .ok_or_else(|| corrupt("a numeric grace"))?;
        let (fingerprint, body) = match v[FLAG_AT] {
            b'-' => (None, HEADER),
            b'f' => {
                let fp = v
                    .get(HEADER..HEADER + FINGERPRINT)
                    .ok_or_else(|| corrupt("a 32-byte fingerprint"))?;
                let fp: [u8; FINGERPRINT] = fp.try_into().map_err(|_| corrupt("a fingerprint"))?;
                (Some(Digest(fp)), HEADER + FINGERPRINT)
            }
            _ => return Err(corrupt("a fingerprint flag")),
        };
        if state != b'c' && v.len() != body && v[body] != b's' {
            return Err(corrupt("a record of its length"));
        }
        Ok(Stored {
            state,
            token: FencingToken(token),
            grace,
            fingerprint,
            body,
        })
    }
}

/// One step as the record holds it: 10 digits of position, 10 of id length,
/// the id, 10 of value length, the value.
fn step_entry(step: &Step) -> Vec<u8> {
    let mut entry = Vec::with_capacity(30 + step.id.len() + step.value.len());
    entry.extend_from_slice(format!("{:010}{:010}", step.at, step.id.len()).as_bytes());
    entry.extend_from_slice(step.id.as_bytes());
    entry.extend_from_slice(format!("{:010}", step.value.len()).as_bytes());
    entry.extend_from_slice(&step.value);
    entry
}

/// A record's steps (`s`, 15 digits of until, entries), by position; a later
/// entry for a position replaces an earlier one.
fn parse_steps(tail: &[u8]) -> Result<Vec<Step>, Error> {
    let Some(mut rest) = tail
        .strip_prefix(b"s")
        .and_then(|t| t.get(15..))
        .filter(|_| digits(&tail[1..16]).is_some())
    else {
        return Err(corrupt("steps"));
    };
    let mut steps = std::collections::BTreeMap::new();
    let number = |rest: &mut &[u8]| -> Result<usize, Error> {
        let (n, after) = rest.split_at_checked(10).ok_or_else(|| corrupt("a step"))?;
        *rest = after;
        digits(n)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| corrupt("a step length"))
    };
    let bytes = |rest: &mut &[u8], len: usize| -> Result<Vec<u8>, Error> {
        let (b, after) = rest
            .split_at_checked(len)
            .ok_or_else(|| corrupt("a step"))?;
        *rest = after;
        Ok(b.to_vec())
    };
    while !rest.is_empty() {
        let at = u32::try_from(number(&mut rest)?).map_err(|_| corrupt("a step position"))?;
        let id_len = number(&mut rest)?;
        let id = String::from_utf8(bytes(&mut rest, id_len)?).map_err(|_| corrupt("a step id"))?;
        let value_len = number(&mut rest)?;
        let value = bytes(&mut rest, value_len)?;
        steps.insert(at, Step::new(at, id, value));
    }
    Ok(steps.into_values().collect())
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
/// (`<time left> <record>`), a claim (`a<token>`, or `t<token>` for a
/// takeover) — one bulk string each, the hot paths — or an existing record
/// `{0 | 2, record, time left}`.
fn decide(reply: Value, given: Option<&Digest>) -> Result<Decided, Error> {
    let mut reply = match reply {
        Value::BulkString(reply) => {
            let took_over = match reply.first() {
                Some(b'a') => false,
                Some(b't') => true,
                _ => return replay_of(reply, given).map(Decided::Claim),
            };
            let token = digits(&reply[1..]).ok_or_else(|| corrupt("a token"))?;
            return Ok(Decided::Claim(Claim::Acquired {
                token: FencingToken(token),
                took_over,
            }));
        }
        Value::Array(items) => items,
        _ => return Err(corrupt("a claim reply")),
    };
    match reply.as_mut_slice() {
        [Value::Int(status @ (0 | 2)), record, left] => {
            let status = *status;
            let Value::BulkString(record) = std::mem::take(record) else {
                return Err(corrupt("a record"));
            };
            let left = int(left)?;
            let stored = Stored::parse(&record)?;
            let token = stored.token;
            let claim = existing(stored, record, left, given)?;
            Ok(if status == 2 {
                Decided::Unacknowledged { token, claim }
            } else {
                Decided::Claim(claim)
            })
        }
        other => Err(corrupt_reply(other, "a claim reply")),
    }
}

/// A replay: `<time left> <record>`; the outcome is moved out of the reply.
fn replay_of(reply: Vec<u8>, given: Option<&Digest>) -> Result<Claim, Error> {
    let space = reply
        .iter()
        .take(21)
        .position(|&b| b == b' ')
        .ok_or_else(|| corrupt("a replay"))?;
    let left = match &reply[..space] {
        [b'-', ..] => 0,
        left => digits(left).ok_or_else(|| corrupt("a time left"))? as i64,
    };
    let mut record = reply;
    record.drain(..=space);
    let stored = Stored::parse(&record)?;
    existing(stored, record, left, given)
}

/// The claim on an existing live record: key reused if its fingerprint
/// differs from `given`, else its outcome (`record` without its header: the
/// bytes moved, not copied) or the time left on its lease (`left`).
fn existing(
    stored: Stored,
    mut record: Vec<u8>,
    left: i64,
    given: Option<&Digest>,
) -> Result<Claim, Error> {
    if let (Some(stored), Some(given)) = (&stored.fingerprint, given) {
        if stored != given {
            return Ok(Claim::FingerprintMismatch);
        }
    }
    Ok(match stored.state {
        b'c' => {
            record.drain(..stored.body);
            Claim::Completed {
                outcome: record,
                fingerprint: stored.fingerprint,
                expires_in: remaining(left),
            }
        }
        b'p' => Claim::InProgress {
            lease_remaining: remaining(left),
        },
        _ => return Err(corrupt("a live record")),
    })
}

/// Reads a get script's reply (`{record, PTTL, unacknowledged}`): the
/// record, and whether it is a completion replicas have not acknowledged yet.
fn read_record(key: &str, reply: Value) -> Result<Option<(Record, bool)>, Error> {
    let mut reply = match reply {
        Value::Nil => return Ok(None),
        Value::Array(items) => items,
        _ => return Err(corrupt("a record reply")),
    };
    let [record, left, unacked] = reply.as_mut_slice() else {
        return Err(corrupt_reply(&reply, "a record of 3 fields"));
    };
    let Value::BulkString(mut record) = std::mem::take(record) else {
        return Err(corrupt("a record"));
    };
    let stored = Stored::parse(&record)?;
    let (state, outcome, expires_in) = match stored.state {
        b'c' => {
            record.drain(..stored.body);
            (RecordState::Completed, Some(record), int(left)?)
        }
        b'p' => {
            let pttl = int(left)?;
            if pttl < 0 {
                return Err(corrupt("an expiry on a processing record"));
            }
            (
                RecordState::Processing,
                None,
                pttl.saturating_sub(stored.grace),
            )
        }
        _ => return Ok(None),
    };
    let record = Record::new(
        key.to_owned(),
        state,
        stored.token,
        stored.fingerprint,
        outcome,
        remaining(expires_in),
    );
    Ok(Some((record, int(unacked)? == 1)))
}

#[async_trait]
impl Store for RedisStore {
    async fn claim(&self, request: ClaimRequest<'_>) -> Result<Claim, Error> {
        let mode = self.mode_arg(false);
        let times = format!("{} {:015}", ms(request.lease), ms(self.grace));
        let fp = request.fingerprint.map(|d| &d.as_bytes()[..]);
        let args = |mode| claim_args(mode, &times, fp);
        let reply: Value = self
            .eval(&self.scripts.claim, request.key, args(&mode))
            .await?;
        let decided = decide(reply, request.fingerprint)?;
        let (Decided::Unacknowledged { .. }, Some(ack)) = (&decided, self.ack) else {
            return Ok(match decided {
                Decided::Claim(claim) | Decided::Unacknowledged { claim, .. } => claim,
            });
        };
        // Wait for the replicas to have the outcome before answering it.
        let mode = self.mode_arg(true);
        let (reply, acked) = self
            .then_wait(&self.scripts.claim, request.key, args(&mode), ack)
            .await?;
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
        let ttl = ms(ttl).to_string();
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
        let token_digits = token_arg(token);
        let args = [token_digits.as_bytes(), outcome, ttl.as_bytes()];
        let (done, acked) = self
            .then_wait(&self.scripts.complete, key, args, ack)
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
        let grace = ms(self.grace).to_string();
        self.fenced(&self.scripts.release, key, token, &[grace.as_bytes()])
            .await
    }

    async fn renew(&self, key: &str, token: FencingToken, lease: Duration) -> Result<(), Error> {
        let lease = ms(lease).to_string();
        self.fenced(&self.scripts.renew, key, token, &[lease.as_bytes()])
            .await
    }

    async fn get(&self, key: &str) -> Result<Option<Record>, Error> {
        let mode = self.mode_arg(false);
        let reply: Value = self.eval(&self.scripts.get, key, [mode.as_bytes()]).await?;
        let read = read_record(key, reply)?;
        let (Some((_, true)), Some(ack)) = (&read, self.ack) else {
            return Ok(read.map(|(record, _)| record));
        };
        let mode = self.mode_arg(true);
        let (reply, acked) = self
            .then_wait(&self.scripts.get, key, [mode.as_bytes()], ack)
            .await?;
        match read_record(key, reply)? {
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

    async fn record_step(
        &self,
        key: &str,
        token: FencingToken,
        step: &Step,
        keep: Duration,
    ) -> Result<(), Error> {
        let entry = step_entry(step);
        let keep = ms(keep).to_string();
        self.fenced(
            &self.scripts.record_step,
            key,
            token,
            &[&entry, keep.as_bytes()],
        )
        .await
    }

    async fn steps(&self, key: &str, held: Option<FencingToken>) -> Result<Vec<Step>, Error> {
        let token = held.map(token_arg);
        let reply: Value = self
            .eval(&self.scripts.steps, key, token.iter().map(|t| t.as_bytes()))
            .await?;
        match reply {
            Value::Nil => Ok(Vec::new()),
            Value::Int(-2) => Err(Error::LeaseLost),
            Value::BulkString(tail) => parse_steps(&tail),
            _ => Err(corrupt("a steps reply")),
        }
    }

    fn keeps_steps(&self) -> bool {
        true
    }

    fn handle(&self) -> Arc<dyn Store> {
        Arc::new(self.clone())
    }

    fn answers_before_recorded(&self) -> bool {
        self.ack.is_none()
    }

    fn kind(&self) -> &'static str {
        match self.conn {
            Conn::Cluster(_) => "redis-cluster",
            Conn::Single(_) => "redis",
        }
    }
}

mod admin;
