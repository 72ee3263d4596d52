//! `idem-chaos serve`: one service process of the workload. `POST /op/{id}`
//! runs an `#[idempotent]` call keyed by the operation id; its body takes a
//! while, then makes the operation's effect, then takes a while more (so a
//! fault can land before the effect, between the effect and the completion,
//! and after). Every execution of the body is appended to this process's
//! executions file before its effect.
//!
//! Three ways to make the effect (`--mode`):
//! - `plain`: the effect is outside every store and not deduplicated (an email
//!   sent): the execution line itself. The unprotected setting.
//! - `derived`: the effect goes to a downstream that deduplicates it by
//!   `current().derive_key(..)`, the same for every attempt of the call (a
//!   payment provider's idempotency key): a row inserted `ON CONFLICT DO NOTHING`.
//! - `tx`: the effect is a row written in the caller's transaction, with the
//!   claim and the completion (`tx =`; SQL stores only).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use idem_runtime::{current, idempotent, Error, PostgresStore, SqliteStore, Store};
use serde::{Deserialize, Serialize};
use sqlx::{Postgres, Sqlite, Transaction};

use crate::history::{self, now_us, Execution};
use crate::rng::Rng;
use crate::stores::{self, Spec};

/// How the body makes its effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Outside every store, not deduplicated.
    Plain,
    /// Downstream, deduplicated by a key derived from the call's key.
    Derived,
    /// In the caller's transaction, with the record (`tx =`).
    Tx,
    /// Not this service: `order-service`'s orders (in the caller's transaction)
    /// and payments (a provider key derived from the call), over its HTTP layer.
    Orders,
}

impl Mode {
    /// Parses `plain`, `derived` or `tx`.
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "plain" => Some(Mode::Plain),
            "derived" => Some(Mode::Derived),
            "tx" => Some(Mode::Tx),
            "orders" => Some(Mode::Orders),
            _ => None,
        }
    }

    /// The name `parse` reads.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Plain => "plain",
            Mode::Derived => "derived",
            Mode::Tx => "tx",
            Mode::Orders => "orders",
        }
    }
}

/// What a completed operation answers (and every replay of it, byte for byte).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Done {
    /// The operation.
    pub op: String,
    /// Which execution produced this answer.
    pub exec: String,
    /// The fencing token it held.
    pub token: u64,
}

/// A failed call.
#[derive(Debug)]
pub enum Fail {
    /// idem refused or failed.
    Idem(Error),
    /// The effect could not be made.
    Effect(String),
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        Fail::Idem(e)
    }
}

impl From<sqlx::Error> for Fail {
    fn from(e: sqlx::Error) -> Self {
        Fail::Effect(e.to_string())
    }
}

impl IntoResponse for Fail {
    fn into_response(self) -> Response {
        let status = match &self {
            Fail::Idem(Error::InProgress { .. }) => StatusCode::CONFLICT,
            Fail::Idem(Error::Store(_) | Error::NotReplicated { .. }) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Fail::Idem(Error::LeaseLost) => StatusCode::GONE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let text = match self {
            Fail::Idem(e) => e.to_string(),
            Fail::Effect(e) => format!("effect failed: {e}"),
        };
        (status, text).into_response()
    }
}

/// Settings of one service process.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where to listen.
    pub addr: String,
    /// The idempotency store.
    pub store: Spec,
    /// How the effect is made.
    pub mode: Mode,
    /// The downstream database of `derived` mode (`postgres://…`, `sqlite://…`).
    pub downstream: Option<String>,
    /// This process's executions file.
    pub executions: PathBuf,
    /// The body's work before and after the effect, at most this long each.
    pub work: Duration,
    /// Redis: replicas that must acknowledge a completion (0: none).
    pub replica_ack: u32,
}

enum Backend {
    Any,
    Pg(PostgresStore),
    Sqlite(SqliteStore),
}

enum Downstream {
    None,
    Pg(sqlx::PgPool),
    Sqlite(sqlx::SqlitePool),
}

struct Service {
    backend: Backend,
    /// The same store as `backend`, for the non-transactional entry point.
    store: Arc<dyn Store>,
    mode: Mode,
    downstream: Downstream,
    executions: Mutex<std::fs::File>,
    work: Duration,
    count: AtomicU64,
    rng: Mutex<Rng>,
}

/// The `tx` entry point for one SQL database: the body of `run`, with the
/// effect a row in the caller's transaction.
macro_rules! tx_run {
    ($name:ident, $db:ty, $store:ident, $insert:expr) => {
        #[idempotent(key = op, name = "chaos-op", store = self.$store(), tx = tx, lease = "2s")]
        async fn $name(&self, tx: &mut Transaction<'_, $db>, op: &str) -> Result<Done, Fail> {
            self.pause().await;
            let done = self.execute(op)?;
            sqlx::query($insert)
                .bind(&done.op)
                .bind(done.token as i64)
                .bind(&done.exec)
                .execute(&mut **tx)
                .await?;
            self.pause().await;
            Ok(done)
        }
    };
}

impl Service {
    #[idempotent(key = op, name = "chaos-op", store = self.store, lease = "2s")]
    async fn run(&self, op: &str) -> Result<Done, Fail> {
        self.pause().await;
        let done = self.execute(op)?;
        if self.mode == Mode::Derived {
            self.downstream(op, &done).await?;
        }
        self.pause().await;
        Ok(done)
    }

    tx_run!(run_pg, Postgres, pg_store, EFFECT_INSERT);
    tx_run!(run_sqlite, Sqlite, sqlite_store, EFFECT_INSERT_SQLITE);

    fn pg_store(&self) -> &PostgresStore {
        match &self.backend {
            Backend::Pg(s) => s,
            _ => unreachable!("run_pg is called only on a PostgreSQL backend"),
        }
    }

    fn sqlite_store(&self) -> &SqliteStore {
        match &self.backend {
            Backend::Sqlite(s) => s,
            _ => unreachable!("run_sqlite is called only on a SQLite backend"),
        }
    }

    async fn pause(&self) {
        let max = self.work.as_micros() as u64;
        let us = self.rng.lock().unwrap().range(0, max);
        tokio::time::sleep(Duration::from_micros(us)).await;
    }

    /// Records this execution (the `plain` effect itself) and names it.
    fn execute(&self, op: &str) -> Result<Done, Fail> {
        let attempt = current().expect("called inside an idempotent body");
        let n = self.count.fetch_add(1, Ordering::Relaxed);
        let done = Done {
            op: op.to_owned(),
            exec: format!("{}-{n}", std::process::id()),
            token: attempt.token().get(),
        };
        let line = Execution {
            op: done.op.clone(),
            token: done.token,
            exec: done.exec.clone(),
            at_us: now_us(),
        };
        history::append(&mut self.executions.lock().unwrap(), &line)
            .map_err(|e| Fail::Effect(e.to_string()))?;
        Ok(done)
    }

    async fn downstream(&self, op: &str, done: &Done) -> Result<(), Fail> {
        let key = current()
            .expect("called inside an idempotent body")
            .derive_key("effect");
        match &self.downstream {
            Downstream::Pg(pool) => {
                sqlx::query(DOWNSTREAM_INSERT)
                    .bind(key)
                    .bind(op)
                    .bind(&done.exec)
                    .execute(pool)
                    .await?;
            }
            Downstream::Sqlite(pool) => {
                sqlx::query(DOWNSTREAM_INSERT_SQLITE)
                    .bind(key)
                    .bind(op)
                    .bind(&done.exec)
                    .execute(pool)
                    .await?;
            }
            Downstream::None => return Err(Fail::Effect("no downstream database".into())),
        }
        Ok(())
    }

    async fn handle(&self, op: &str) -> Result<Done, Fail> {
        match (&self.backend, self.mode) {
            (Backend::Pg(s), Mode::Tx) => {
                let mut tx = s.pool().begin().await?;
                let done = self.run_pg(&mut tx, op).await?;
                tx.commit().await?;
                Ok(done)
            }
            (Backend::Sqlite(s), Mode::Tx) => {
                let mut tx = s.pool().begin().await?;
                let done = self.run_sqlite(&mut tx, op).await?;
                tx.commit().await?;
                Ok(done)
            }
            (Backend::Any, Mode::Tx) => Err(Fail::Effect("tx mode needs a SQL store".into())),
            (_, Mode::Orders) => Err(Fail::Effect("orders are served by order-service".into())),
            _ => self.run(op).await,
        }
    }
}

/// The `tx` effect: one row per execution that committed.
pub const EFFECT_INSERT: &str = "INSERT INTO chaos_effects (op, token, exec) VALUES ($1, $2, $3)";
const EFFECT_INSERT_SQLITE: &str =
    "INSERT INTO chaos_effects (op, token, exec) VALUES (?1, ?2, ?3)";
/// The `derived` effect: at most one row per derived key.
const DOWNSTREAM_INSERT: &str =
    "INSERT INTO chaos_downstream (dkey, op, exec) VALUES ($1, $2, $3) ON CONFLICT (dkey) DO NOTHING";
const DOWNSTREAM_INSERT_SQLITE: &str =
    "INSERT INTO chaos_downstream (dkey, op, exec) VALUES (?1, ?2, ?3) ON CONFLICT (dkey) DO NOTHING";

async fn op(State(svc): State<Arc<Service>>, Path(id): Path<String>) -> Response {
    match svc.handle(&id).await {
        Ok(done) => axum::Json(done).into_response(),
        Err(fail) => fail.into_response(),
    }
}

/// Runs a service process until it is killed.
pub async fn serve(settings: Settings) -> Result<(), Box<dyn std::error::Error>> {
    let (backend, store): (Backend, Arc<dyn Store>) = match (&settings.store, settings.mode) {
        (Spec::Postgres(url), Mode::Tx) => {
            let s = stores::postgres(url).await?;
            (Backend::Pg(s.clone()), s.handle())
        }
        (Spec::Sqlite(path), Mode::Tx) => {
            let s = stores::sqlite(path).await?;
            (Backend::Sqlite(s.clone()), s.handle())
        }
        (spec, _) => {
            let s = stores::open(spec, settings.replica_ack).await?;
            (Backend::Any, s)
        }
    };
    let downstream = match settings.downstream.as_deref() {
        None => Downstream::None,
        Some(url) if url.starts_with("postgres") => Downstream::Pg(
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(8)
                .connect(url)
                .await?,
        ),
        Some(url) => Downstream::Sqlite(stores::sqlite_pool(url).await?),
    };
    let service = Arc::new(Service {
        backend,
        store,
        mode: settings.mode,
        downstream,
        executions: Mutex::new(history::open_append(&settings.executions)?),
        work: settings.work,
        count: AtomicU64::new(0),
        rng: Mutex::new(Rng::new(u64::from(std::process::id()))),
    });
    let app = Router::new()
        .route("/op/{id}", post(op))
        .with_state(service);
    let listener = tokio::net::TcpListener::bind(&settings.addr).await?;
    println!("listening on {}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
