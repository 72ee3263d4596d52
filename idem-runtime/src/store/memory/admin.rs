//! [`Admin`] for [`MemoryStore`]: reads under each shard's lock, writes
//! fenced under the record's.

use async_trait::async_trait;
use tokio::time::Instant;

use super::{lock, Entry as Stored, MemoryStore, State};
use crate::error::Error;
use crate::store::admin::{self, Admin, Count, Entry, Query, Status};
use crate::store::FencingToken;

/// The record as an operator sees it at `now`.
fn entry(key: &str, stored: &Stored, now: Instant) -> Entry {
    let kept = stored.kept_steps(now);
    let (status, until, outcome_len) = match &stored.state {
        State::Processing { lease_until } if *lease_until > now => {
            (Status::Running, Some(*lease_until), None)
        }
        State::Processing { .. } => (Status::Lapsed, None, None),
        State::Completed {
            outcome,
            expires_at,
        } => {
            let status = if *expires_at > now {
                Status::Completed
            } else {
                Status::Expired
            };
            (status, Some(*expires_at), Some(outcome.len() as u64))
        }
        State::Released => match kept {
            Some(steps) => (Status::Released, Some(steps.until), None),
            None => (Status::Expired, None, None),
        },
    };
    Entry::new(
        key.to_owned(),
        status,
        stored.token,
        stored.fingerprint,
        outcome_len,
        until.map_or_else(Default::default, |u| u.saturating_duration_since(now)),
        kept.map_or(&[][..], |steps| &steps.list),
    )
}

impl MemoryStore {
    /// Every stored record, read shard by shard.
    fn entries(&self) -> Vec<Entry> {
        let now = Instant::now();
        let mut all = Vec::new();
        for shard in self.inner.shards.iter() {
            let shard = lock(shard);
            all.extend(shard.records.iter().map(|(k, e)| entry(k, e, now)));
        }
        all
    }

    /// Removes the record if it holds `token` and `ends` accepts its state.
    fn end(
        &self,
        key: &str,
        token: FencingToken,
        ends: impl FnOnce(&State) -> bool,
    ) -> Result<(), Error> {
        let mut shard = self.inner.shard(key);
        match shard.records.get(key) {
            Some(stored) if stored.token == token && ends(&stored.state) => {
                shard.records.remove(key);
                Ok(())
            }
            _ => Err(Error::LeaseLost),
        }
    }
}

#[async_trait]
impl Admin for MemoryStore {
    async fn inspect(&self, key: &str) -> Result<Option<Entry>, Error> {
        let shard = self.inner.shard(key);
        let now = Instant::now();
        Ok(shard.records.get(key).map(|e| entry(key, e, now)))
    }

    async fn list(&self, query: &Query) -> Result<Vec<Entry>, Error> {
        let mut found: Vec<Entry> = self
            .entries()
            .into_iter()
            .filter(|e| query.matches(e))
            .collect();
        found.sort_by(|a, b| a.key.cmp(&b.key));
        found.truncate(query.limit);
        Ok(found)
    }

    async fn stats(&self) -> Result<Vec<Count>, Error> {
        let entries = self.entries();
        Ok(admin::tally(
            entries.iter().map(|e| (e.key.as_str(), e.status)),
        ))
    }

    async fn invalidate(&self, key: &str, token: FencingToken) -> Result<(), Error> {
        self.end(key, token, |state| matches!(state, State::Completed { .. }))
    }

    async fn forget(&self, key: &str, token: FencingToken) -> Result<(), Error> {
        self.end(key, token, |state| {
            matches!(state, State::Processing { .. } | State::Released)
        })
    }
}
