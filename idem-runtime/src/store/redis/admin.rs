//! [`Admin`] for [`RedisStore`]: records are found with `SCAN` (every
//! master of a Cluster, each scanned on its own; never `KEYS`), then each is
//! read by one script on its key; fenced writes are one script each.

use std::sync::LazyLock;

use async_trait::async_trait;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Script, Value};

use super::{
    bytes, corrupt, corrupt_reply, digits, int, ms, parse_steps, remaining, store_error, token_arg,
    Conn, RedisStore, Stored,
};
use crate::error::Error;
use crate::store::admin::{self, Admin, Count, Entry, Query, Status};
use crate::store::FencingToken;

/// `{record, PTTL, now (ms, Redis's clock), outcome size}`, or nil. A
/// completed record is answered without its outcome (only its size).
const INSPECT: &str = r#"
local v = redis.pcall('GET', KEYS[1])
if type(v) == 'table' then return {-1, 'a string record'} end
if not v then return false end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local pttl = redis.call('PTTL', KEYS[1])
if #v >= 39 and string.byte(v) == 99 then
  local body = (string.byte(v, 39) == 102) and 71 or 39
  return {string.sub(v, 1, body), pttl, now, #v - body}
end
return {v, pttl, now, 0}
"#;

/// If the record holds token `ARGV[1]` and its state is one of `ARGV[3]`
/// (state bytes), replaces it by a released record without steps that keeps
/// the token, for `ARGV[2]` ms (the store's grace, as a release leaves it).
const END: &str = r#"
local v = redis.pcall('GETRANGE', KEYS[1], 0, 38)
if type(v) ~= 'string' or #v < 39 or string.sub(v, 4, 23) ~= ARGV[1] then return 0 end
if not string.find(ARGV[3], string.sub(v, 1, 1), 1, true) then return 0 end
redis.call('SET', KEYS[1], 'r\0\0' .. string.sub(v, 4, 23) .. '000000000000000-', 'PX', ARGV[2])
return 1
"#;

struct Scripts {
    inspect: Script,
    end: Script,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    inspect: Script::new(INSPECT),
    end: Script::new(END),
});

/// How many keys one `SCAN` step asks for.
const SCAN_COUNT: usize = 500;

/// `text` with Redis's glob characters escaped.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Reads an inspect script's reply for `key`.
fn entry(key: &str, reply: Value) -> Result<Option<Entry>, Error> {
    let reply = match reply {
        Value::Nil => return Ok(None),
        Value::Array(items) => items,
        _ => return Err(corrupt("an inspect reply")),
    };
    let [record, pttl, now, outcome_len] = reply.as_slice() else {
        return Err(corrupt_reply(&reply, "an inspect reply of 4 fields"));
    };
    let record = bytes(record).ok_or_else(|| corrupt("a record"))?;
    let (pttl, now, outcome_len) = (int(pttl)?, int(now)?, int(outcome_len)?);
    let stored = Stored::parse(record)?;
    let tail = &record[stored.body..];
    let (status, left, steps, outcome) = match stored.state {
        b'c' => (
            Status::Completed,
            pttl,
            Vec::new(),
            Some(outcome_len as u64),
        ),
        b'p' => {
            if pttl < 0 {
                return Err(corrupt("an expiry on a processing record"));
            }
            let left = pttl.saturating_sub(stored.grace);
            let steps = kept_steps(tail, now)?.unwrap_or_default();
            let status = if left > 0 {
                Status::Running
            } else {
                Status::Lapsed
            };
            (status, left, steps, None)
        }
        _ => match kept_until(tail)?.filter(|until| *until > now) {
            Some(until) => (Status::Released, until - now, parse_steps(tail)?, None),
            None => (Status::Expired, 0, Vec::new(), None),
        },
    };
    Ok(Some(Entry::new(
        key.to_owned(),
        status,
        stored.token,
        stored.fingerprint,
        outcome,
        remaining(left),
        &steps,
    )))
}

/// When a record's steps are kept until (ms, Redis's clock), if it has any.
fn kept_until(tail: &[u8]) -> Result<Option<i64>, Error> {
    if tail.is_empty() {
        return Ok(None);
    }
    tail.get(1..16)
        .and_then(digits)
        .and_then(|u| i64::try_from(u).ok())
        .map(Some)
        .ok_or_else(|| corrupt("steps"))
}

/// A record's steps, if they are kept at `now`.
fn kept_steps(tail: &[u8], now: i64) -> Result<Option<Vec<crate::store::Step>>, Error> {
    match kept_until(tail)? {
        Some(until) if until > now => parse_steps(tail).map(Some),
        _ => Ok(None),
    }
}

impl RedisStore {
    /// The masters' addresses: the store's own server, or each Cluster master.
    async fn masters(&self) -> Result<Vec<Option<(String, u16)>>, Error> {
        let Conn::Cluster(conn) = &self.conn else {
            return Ok(vec![None]);
        };
        let mut conn = conn.clone();
        let slots = conn
            .route_command(
                redis::cmd("CLUSTER").arg("SLOTS").clone(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary),
            )
            .await
            .map_err(store_error)?;
        let Value::Array(ranges) = slots else {
            return Err(Error::store("CLUSTER SLOTS answered no ranges"));
        };
        let mut masters = Vec::new();
        for range in ranges {
            // [start, end, [host, port, id, ..], replicas..]
            let master = match &range {
                Value::Array(parts) => parts.get(2),
                _ => None,
            };
            let Some(Value::Array(node)) = master else {
                return Err(Error::store(
                    "CLUSTER SLOTS answered a range without a master",
                ));
            };
            let host = node
                .first()
                .and_then(bytes)
                .and_then(|b| std::str::from_utf8(b).ok())
                .ok_or_else(|| Error::store("CLUSTER SLOTS answered a master without a host"))?;
            let port = node
                .get(1)
                .map(int)
                .transpose()?
                .and_then(|p| u16::try_from(p).ok())
                .ok_or_else(|| Error::store("CLUSTER SLOTS answered a master without a port"))?;
            let address = Some((host.to_owned(), port));
            if !masters.contains(&address) {
                masters.push(address);
            }
        }
        Ok(masters)
    }

    /// One `SCAN` step on `master` (`None`: the single server).
    async fn scan_step(
        &self,
        master: &Option<(String, u16)>,
        cursor: u64,
        pattern: &str,
    ) -> Result<(u64, Vec<Vec<u8>>), Error> {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(SCAN_COUNT);
        let reply = match (&self.conn, master) {
            (Conn::Cluster(conn), Some((host, port))) => {
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port: *port,
                });
                conn.clone().route_command(cmd, routing).await
            }
            _ => cmd.query_async(&mut self.conn.clone()).await,
        }
        .map_err(store_error)?;
        redis::from_redis_value(reply).map_err(|e| Error::store(format!("a SCAN reply: {e}")))
    }

    /// Visits every record whose storage key matches `namespace` and
    /// `digest` (any, for `None`), master by master, until `visit` says stop.
    async fn scan(
        &self,
        namespace: Option<&str>,
        digest: Option<&crate::Digest>,
        mut visit: impl FnMut(Entry) -> bool + Send,
    ) -> Result<(), Error> {
        let pattern = format!(
            "{}{}:{}",
            glob_escape(&self.prefix),
            namespace.map_or_else(|| "*".to_owned(), glob_escape),
            digest.map_or_else(|| "*".to_owned(), |d| d.to_hex())
        );
        for master in self.masters().await? {
            let mut cursor = 0;
            loop {
                let (next, keys) = self.scan_step(&master, cursor, &pattern).await?;
                for redis_key in keys {
                    let Some(key) = redis_key.strip_prefix(self.prefix.as_bytes()) else {
                        continue;
                    };
                    let Ok(key) = std::str::from_utf8(key) else {
                        // Not a key idem writes: reported, not skipped.
                        let key = String::from_utf8_lossy(key).into_owned();
                        if !visit(Entry::corrupt(key, "the stored key is not UTF-8")) {
                            return Ok(());
                        }
                        continue;
                    };
                    if namespace.is_some_and(|ns| !admin::in_namespace(key, ns)) {
                        continue;
                    }
                    // Gone since the scan saw it: skipped. Unreadable:
                    // reported apart.
                    let read = self.inspect(key).await.transpose();
                    if let Some(entry) = read.map(|r| Entry::or_corrupt(key, r)).transpose()? {
                        if !visit(entry) {
                            return Ok(());
                        }
                    }
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(())
    }

    async fn end(&self, key: &str, token: FencingToken, states: &str) -> Result<(), Error> {
        let (token, grace) = (token_arg(token), ms(self.grace).to_string());
        let args = [token.as_bytes(), grace.as_bytes(), states.as_bytes()];
        let done: i64 = self.eval(&SCRIPTS.end, key, args).await?;
        if done == 1 {
            Ok(())
        } else {
            Err(Error::LeaseLost)
        }
    }
}

#[async_trait]
impl Admin for RedisStore {
    async fn inspect(&self, key: &str) -> Result<Option<Entry>, Error> {
        let reply: Value = self.eval(&SCRIPTS.inspect, key, std::iter::empty()).await?;
        entry(key, reply)
    }

    async fn list(&self, query: &Query) -> Result<Vec<Entry>, Error> {
        let mut found = Vec::new();
        if query.limit == 0 {
            return Ok(found);
        }
        let (namespace, digest) = (query.namespace.as_deref(), query.digest.as_ref());
        self.scan(namespace, digest, |entry| {
            if query.matches(&entry) {
                found.push(entry);
            }
            found.len() < query.limit
        })
        .await?;
        Ok(found)
    }

    async fn stats(&self) -> Result<Vec<Count>, Error> {
        let mut seen = Vec::new();
        self.scan(None, None, |entry| {
            seen.push((entry.key, entry.status));
            true
        })
        .await?;
        Ok(admin::tally(seen.iter().map(|(k, s)| (k.as_str(), *s))))
    }

    async fn invalidate(&self, key: &str, token: FencingToken) -> Result<(), Error> {
        self.end(key, token, "c").await
    }

    async fn forget(&self, key: &str, token: FencingToken) -> Result<(), Error> {
        self.end(key, token, "pr").await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_are_escaped() {
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
        assert_eq!(glob_escape("crate::m::f"), "crate::m::f");
    }

    #[test]
    fn a_short_record_is_corrupt() {
        let reply = Value::Array(vec![
            Value::BulkString(b"p00".to_vec()),
            Value::Int(10),
            Value::Int(0),
            Value::Int(0),
        ]);
        assert!(matches!(entry("k", reply), Err(Error::Codec(_))));
    }
}
