//! Steps inside an idempotent call: [`step`] runs its work at most once per
//! logical call. Its `Ok` value is recorded under the call's key, fenced by the
//! attempt's token, before the step returns; a later attempt of the call (after
//! a crash, a lapsed lease, a release) replays each recorded step without
//! running it and runs the first one not recorded. CONTRACT §3.4.

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::OnceCell;

use super::attempt::current_step_log;
use crate::codec;
use crate::error::Error;
use crate::key::Key;
use crate::store::{FencingToken, Step, Store};

/// Names a [`step`]: a name (`"charge"`), or a name and an index for a step
/// that runs once per item of a loop (`("ship", i)`). Within one call every
/// step's id is different, and a resumed call must reach the same ids in the
/// same order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StepId {
    name: String,
    index: Option<u64>,
}

impl StepId {
    /// A step named `name`.
    pub fn new(name: impl Into<String>) -> Self {
        StepId {
            name: name.into(),
            index: None,
        }
    }

    /// A step named `name` for item `index` of a loop.
    pub fn indexed(name: impl Into<String>, index: u64) -> Self {
        StepId {
            name: name.into(),
            index: Some(index),
        }
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The index, for a step in a loop.
    pub fn index(&self) -> Option<u64> {
        self.index
    }

    /// How the id is stored: JSON, `"charge"` or `["ship",3]`, so no name
    /// can pass for an indexed id.
    fn stored(&self) -> String {
        match self.index {
            None => serde_json::Value::from(self.name.as_str()).to_string(),
            Some(index) => serde_json::json!([self.name, index]).to_string(),
        }
    }
}

impl fmt::Display for StepId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.stored())
    }
}

impl From<&str> for StepId {
    fn from(name: &str) -> Self {
        StepId::new(name)
    }
}

impl From<String> for StepId {
    fn from(name: String) -> Self {
        StepId::new(name)
    }
}

macro_rules! indexed_from {
    ($($int:ty),*) => {$(
        impl From<(&str, $int)> for StepId {
            fn from((name, index): (&str, $int)) -> Self {
                StepId::indexed(name, index as u64)
            }
        }
        impl From<(String, $int)> for StepId {
            fn from((name, index): (String, $int)) -> Self {
                StepId::indexed(name, index as u64)
            }
        }
    )*};
}

indexed_from!(usize, u64, u32, u16, u8);

/// Runs `work` as step `id` of the idempotent call running now, at most once
/// per logical call, and returns its value.
///
/// The first attempt to reach the step runs `work`; its `Ok` value is recorded
/// under the call's key, fenced by the attempt's token, before `step` returns.
/// A later attempt of the same call (after a crash, a lapsed lease, or an
/// error or cancellation that released the claim) gets the recorded value back
/// without running `work`. An `Err` is not recorded: the step runs again on
/// the next attempt. Steps are told apart by id and position: a resumed body
/// must call the same steps in the same order ([`Error::StepMismatch`]
/// otherwise); in a loop, give each its index (`step(("ship", i), ..)`). The
/// steps of a call run one at a time, so their order is the body's: to make
/// effects concurrently, join them inside one step.
///
/// ```
/// use idem_runtime::{idempotent, step, MemoryStore};
///
/// # #[derive(Debug)] struct E(idem_runtime::Error);
/// # impl From<idem_runtime::Error> for E { fn from(e: idem_runtime::Error) -> Self { E(e) } }
/// struct Checkout { store: MemoryStore }
///
/// impl Checkout {
///     #[idempotent(key = order_id, store = self.store)]
///     async fn checkout(&self, order_id: u64) -> Result<String, E> {
///         let hold = step("reserve-stock", async { Ok::<_, E>(format!("hold-{order_id}")) }).await?;
///         let charge = step("charge", async { Ok::<_, E>(1999u32) }).await?;
///         Ok(format!("{hold} charged {charge}"))
///     }
/// }
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// # let c = Checkout { store: MemoryStore::new() };
/// # assert_eq!(c.checkout(7).await.unwrap(), "hold-7 charged 1999");
/// # }
/// ```
///
/// Errors (as `E`, through `From<idem_runtime::Error>`): [`Error::StepMisuse`]
/// outside an idempotent call, while another step of the call runs (inside
/// it or beside it), for an id already used in this call, in a `tx =` call,
/// or on a store that does not keep steps; [`Error::StepMismatch`]; and, after `work`
/// ran, [`Error::LeaseLost`] (another attempt took the call over: the value is
/// not recorded), [`Error::Codec`] (a value JSON cannot hold faithfully) or
/// [`Error::Store`] (the store failed three times): the step's effect happened
/// and is not recorded, so make it idempotent downstream too
/// ([`Attempt::derive_key`](crate::Attempt::derive_key)).
pub async fn step<T, E, F>(id: impl Into<StepId>, work: F) -> Result<T, E>
where
    T: Serialize + DeserializeOwned,
    E: From<Error>,
    F: Future<Output = Result<T, E>>,
{
    let id = id.into();
    let log = current_step_log()?;
    let (at, _running) = match prepare(&log, &id).await? {
        Next::Replay(value) => return Ok(value),
        Next::Run(at, running) => (at, running),
    };
    let value = work.await?;
    log.record(at, &id, codec::encode_ok(&value)?).await?;
    Ok(value)
}

/// A [`step`] whose writes and whose record commit together ("atomic
/// phases"): idem begins a transaction on the call's own SQL store, `work`
/// makes the phase's writes in it, the step is recorded in it (fenced by the
/// attempt's token), and it commits before `step_in_tx` returns. A crash
/// before the commit loses both, and the next attempt runs the phase again;
/// after it, both are there, and it replays. The database is never half-way
/// through a phase.
///
/// ```no_run
/// # use idem_runtime::{idempotent, step_in_tx, SqliteStore};
/// # #[derive(Debug)] struct E;
/// # impl From<idem_runtime::Error> for E { fn from(_: idem_runtime::Error) -> Self { E } }
/// # impl From<sqlx::Error> for E { fn from(_: sqlx::Error) -> Self { E } }
/// # struct Shop { store: SqliteStore }
/// impl Shop {
///     #[idempotent(key = order_id, store = self.store)]
///     async fn reserve(&self, order_id: i64) -> Result<i64, E> {
///         step_in_tx("hold-stock", &self.store, |tx| Box::pin(async move {
///             sqlx::query("UPDATE stock SET quantity = quantity - 1 WHERE product_id = 1")
///                 .execute(&mut **tx)
///                 .await?;
///             Ok::<_, E>(order_id)
///         }))
///         .await
///     }
/// }
/// ```
///
/// `store` must be the store the call claimed with (the step lives in the
/// call's record; another store answers [`Error::LeaseLost`]). While the
/// phase runs, its transaction holds the call's record (PostgreSQL: the row;
/// SQLite: the write lock), so the lease is renewed only after it commits:
/// keep a phase shorter than the lease. Errors as for [`step`]; a store
/// error is not retried in place (the phase's transaction is rolled back).
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub async fn step_in_tx<S, DB, T, E, F>(id: impl Into<StepId>, store: &S, work: F) -> Result<T, E>
where
    S: crate::store::sql::PhaseStore<DB> + ?Sized,
    DB: sqlx::Database,
    T: Serialize + DeserializeOwned,
    E: From<Error>,
    F: for<'c> FnOnce(&'c mut sqlx::Transaction<'static, DB>) -> Phase<'c, T, E>,
{
    let id = id.into();
    let log = current_step_log()?;
    // Earlier steps are read before the phase takes a connection of its own.
    let (at, _running) = match prepare(&log, &id).await? {
        Next::Replay(value) => return Ok(value),
        Next::Run(at, running) => (at, running),
    };
    let mut tx = store.begin_phase().await?;
    let value = work(&mut tx).await?;
    let step = Step::new(at, id.stored(), codec::encode_ok(&value)?);
    store
        .record_step_in(&mut tx, log.key.as_str(), log.token, &step, log.keep)
        .await
        .inspect_err(|err| tracing::error!(at, step = %step.id, error = %err, "the step could not be recorded in its transaction"))?;
    tx.commit().await.map_err(|err| {
        tracing::error!(at, step = %step.id, error = %err, "the phase's commit failed (it may or may not have landed)");
        Error::store(err)
    })?;
    tracing::debug!(at, step = %step.id, token = log.token.0, "phase committed with its step");
    Ok(value)
}

/// A phase's work ([`step_in_tx`]): a boxed future borrowing the phase's
/// transaction, `|tx| Box::pin(async move { .. })` (boxed, so a call that
/// runs phases is still a `Send` future that can be spawned).
pub type Phase<'c, T, E> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, E>> + Send + 'c>>;

/// What a step does next: replay a recorded value, or run at a position.
enum Next<'a, T> {
    Replay(T),
    Run(u32, Running<'a>),
}

/// The checks every step makes before its work: may it run here, and was it
/// recorded by an earlier attempt (replayed), at another position
/// ([`Error::StepMismatch`]), or not at all (run, at `at`).
async fn prepare<'a, T: DeserializeOwned>(
    log: &'a StepLog,
    id: &StepId,
) -> Result<Next<'a, T>, Error> {
    let (at, running) = log.begin(id)?;
    let stored = id.stored();
    let earlier = log.earlier().await?;
    match earlier.iter().find(|s| s.at == at) {
        Some(recorded) if recorded.id == stored => {
            tracing::debug!(at, step = %stored, "step replayed");
            Ok(Next::Replay(codec::decode_ok(&recorded.value)?))
        }
        Some(recorded) => Err(log.diverged(at, recorded.id.clone(), format!("called {stored}"))),
        // Recorded at another position: its effect happened; never again.
        None => match earlier.iter().find(|s| s.id == stored) {
            Some(elsewhere) => Err(log.diverged(
                elsewhere.at,
                stored,
                format!("reached it at step {at} instead"),
            )),
            None => Ok(Next::Run(at, running)),
        },
    }
}

/// Marks the log's step as running until dropped (the step finished, failed,
/// or its future was dropped).
struct Running<'a>(&'a AtomicBool);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// The id of the mark a refused takeover leaves (`on_takeover = fail`): not
/// JSON, so no step's id can be it; at the last position, so none reaches it.
const TAKEOVER_MARK: &str = "idem:takeover";

/// The mark a refused takeover records, so every retry meets the takeover.
pub(super) fn takeover_mark() -> Step {
    Step::new(u32::MAX, TAKEOVER_MARK.into(), b"{\"ok\":null}".to_vec())
}

/// One attempt's steps: the positions it has reached, and (for an attempt that
/// continues an earlier one) the steps recorded before it.
pub(crate) struct StepLog {
    store: Arc<dyn Store>,
    key: Key,
    token: FencingToken,
    keep: Duration,
    /// Whether earlier attempts may have recorded steps (else none are read).
    took_over: bool,
    /// Whether the store keeps steps at all (asked before any step runs).
    kept: bool,
    next: AtomicU32,
    /// Whether a step of this attempt is running (steps run one at a time).
    running: AtomicBool,
    ids: Mutex<HashSet<StepId>>,
    recorded: OnceCell<Vec<Step>>,
    /// The first mismatch a step met: the call's outcome must not be
    /// recorded (even an error the codec caches), so a fixed body can resume.
    mismatch: Mutex<Option<(u32, String, String)>>,
}

impl StepLog {
    pub(super) fn new(
        store: Arc<dyn Store>,
        key: Key,
        token: FencingToken,
        keep: Duration,
        took_over: bool,
    ) -> Self {
        let kept = store.keeps_steps();
        StepLog {
            store,
            key,
            token,
            keep,
            took_over,
            kept,
            next: AtomicU32::new(0),
            running: AtomicBool::new(false),
            ids: Mutex::new(HashSet::new()),
            recorded: OnceCell::new(),
            mismatch: Mutex::new(None),
        }
    }

    /// The position of step `id`, after the checks that it may run here, and
    /// the mark that it runs.
    fn begin(&self, id: &StepId) -> Result<(u32, Running<'_>), Error> {
        if !self.kept {
            return Err(Error::StepMisuse(format!(
                "step {id}: this call's store does not keep steps (Store::keeps_steps)"
            )));
        }
        if self
            .running
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return Err(Error::StepMisuse(format!(
                "step {id} was called while another step of this call was running (inside it \
                 or beside it): a call's steps run one at a time; join concurrent effects \
                 inside one step"
            )));
        }
        let running = Running(&self.running);
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        if !ids.insert(id.clone()) {
            return Err(Error::StepMisuse(format!(
                "step {id} was already called in this call; a step that repeats needs an index, \
                 step((\"{}\", i), ..)",
                id.name
            )));
        }
        let at = self.next.fetch_add(1, Ordering::Relaxed);
        drop(ids);
        Ok((at, running))
    }

    /// The mismatch a step met (kept for the completion to refuse), as the error.
    fn diverged(&self, at: u32, recorded: String, called: String) -> Error {
        tracing::error!(at, recorded = %recorded, called = %called, "step mismatch");
        let mut first = self.mismatch.lock().unwrap_or_else(|p| p.into_inner());
        first.get_or_insert_with(|| (at, recorded.clone(), called.clone()));
        Error::StepMismatch {
            at,
            recorded,
            called,
        }
    }

    /// The steps earlier attempts recorded, read once (none without a takeover).
    async fn earlier(&self) -> Result<&[Step], Error> {
        if !self.took_over {
            return Ok(&[]);
        }
        let steps = self
            .recorded
            .get_or_try_init(|| self.store.steps(self.key.as_str(), Some(self.token)))
            .await?;
        Ok(steps)
    }

    /// Records step `id`'s value at `at`; a store failure is retried twice (20
    /// ms, 40 ms), as a completion is.
    async fn record(&self, at: u32, id: &StepId, value: Vec<u8>) -> Result<(), Error> {
        let step = Step::new(at, id.stored(), value);
        let mut pause = Duration::from_millis(20);
        let mut tries = 0;
        loop {
            tries += 1;
            match self
                .store
                .record_step(self.key.as_str(), self.token, &step, self.keep)
                .await
            {
                Ok(()) => {
                    tracing::debug!(at, step = %step.id, token = self.token.0, "step recorded");
                    return Ok(());
                }
                Err(Error::Store(err)) if tries < 3 => {
                    tracing::warn!(at, step = %step.id, error = %err, "could not record the step; retrying");
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
                Err(err) => {
                    tracing::error!(
                        at, step = %step.id, token = self.token.0, error = %err,
                        "the step ran but could not be recorded"
                    );
                    return Err(err);
                }
            }
        }
    }

    /// Before the call's outcome is recorded: every step an earlier attempt
    /// recorded was reached again, else [`Error::StepMismatch`].
    pub(super) async fn check_finished(&self) -> Result<(), Error> {
        let first = self
            .mismatch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some((at, recorded, called)) = first {
            return Err(Error::StepMismatch {
                at,
                recorded,
                called,
            });
        }
        let reached = self.next.load(Ordering::Relaxed);
        match self
            .earlier()
            .await?
            .iter()
            .find(|s| s.at >= reached && s.id != TAKEOVER_MARK)
        {
            None => Ok(()),
            Some(missed) => {
                tracing::error!(at = missed.at, recorded = %missed.id, "the body returned before a recorded step");
                Err(Error::StepMismatch {
                    at: missed.at,
                    recorded: missed.id.clone(),
                    called: "returned first".into(),
                })
            }
        }
    }
}
