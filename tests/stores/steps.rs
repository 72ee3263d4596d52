//! Steps through `#[idempotent]` on the real stores: an attempt that fails,
//! is cancelled or panics after each step, or whose process is killed
//! (SIGKILL) between two steps, is followed by one that replays the recorded
//! steps and runs the rest, each step's effect made once. (The conformance
//! suite checks the store calls; the attribute tests the engine on memory.)

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem_runtime::{current, idempotent, step, PostgresStore, RedisStore, SqliteStore, Store};
use idem_tests::{postgres_url, redis_url, unique};

#[derive(Debug)]
enum AppError {
    Idem(idem_runtime::Error),
    Down,
}

impl From<idem_runtime::Error> for AppError {
    fn from(e: idem_runtime::Error) -> Self {
        AppError::Idem(e)
    }
}

const STEPS: [&str; 4] = ["reserve", "charge", "ship", "mail"];

#[derive(Clone, Copy, Debug)]
enum Fault {
    Fail,
    Hang,
    Panic,
}

struct Flow {
    store: Arc<dyn Store>,
    effects: Mutex<BTreeMap<&'static str, usize>>,
    fault: Mutex<Option<(&'static str, Fault)>>,
    took_over: Mutex<Vec<bool>>,
    /// Told when an attempt reaches the step where it hangs.
    hung: tokio::sync::Notify,
}

impl Flow {
    #[idempotent(key = order, name = "store-steps", lease = "1h", ttl = "1h", store = self.store)]
    async fn run(self: Arc<Self>, order: String) -> Result<String, AppError> {
        self.took_over
            .lock()
            .unwrap()
            .push(current().unwrap().took_over());
        let mut done = Vec::new();
        for name in STEPS {
            let this = Arc::clone(&self);
            done.push(step(name, async move { this.effect(name).await }).await?);
        }
        Ok(done.join("/"))
    }

    async fn effect(&self, name: &'static str) -> Result<String, AppError> {
        let fault = {
            let mut fault = self.fault.lock().unwrap();
            match *fault {
                Some((at, what)) if at == name => fault.take().map(|_| what),
                _ => None,
            }
        };
        match fault {
            Some(Fault::Fail) => return Err(AppError::Down),
            Some(Fault::Hang) => {
                self.hung.notify_one();
                std::future::pending::<()>().await
            }
            Some(Fault::Panic) => panic!("{name} panicked (on purpose)"),
            None => {}
        }
        let mut effects = self.effects.lock().unwrap();
        let n = effects.entry(name).or_default();
        *n += 1;
        Ok(format!("{name}-{n}"))
    }
}

async fn resumes_after_every_step(store: Arc<dyn Store>) {
    for fault in [Fault::Fail, Fault::Hang, Fault::Panic] {
        for (i, at) in STEPS.into_iter().enumerate() {
            let flow = Arc::new(Flow {
                store: Arc::clone(&store),
                effects: Mutex::default(),
                fault: Mutex::new(Some((at, fault))),
                took_over: Mutex::default(),
                hung: tokio::sync::Notify::new(),
            });
            let order = unique("steps");
            let first = tokio::spawn(Arc::clone(&flow).run(order.clone()));
            match fault {
                Fault::Fail => assert!(matches!(first.await.unwrap(), Err(AppError::Down))),
                Fault::Panic => assert!(first.await.unwrap_err().is_panic()),
                Fault::Hang => {
                    // Cancelled once it hangs in step `at` (the ones before are recorded).
                    flow.hung.notified().await;
                    first.abort();
                    assert!(first.await.unwrap_err().is_cancelled());
                }
            }
            // The release of a dropped claim runs in a task of its own: a
            // retry that meets the claim first waits for it (lease 1 h: only
            // the release can end it).
            let second = loop {
                match Arc::clone(&flow).run(order.clone()).await {
                    Err(AppError::Idem(idem_runtime::Error::InProgress { .. })) => {
                        tokio::time::sleep(Duration::from_millis(10)).await
                    }
                    other => break other,
                }
            };
            let expected = STEPS.map(|s| format!("{s}-1")).join("/");
            assert_eq!(second.unwrap(), expected, "{fault:?} at {at}");
            for name in STEPS {
                assert_eq!(
                    flow.effects.lock().unwrap()[name],
                    1,
                    "{fault:?} at {at}: {name}"
                );
            }
            assert_eq!(
                flow.took_over.lock().unwrap().last(),
                Some(&(i > 0)),
                "{fault:?} at {at}: the retry knows it resumed recorded steps"
            );
            assert_eq!(Arc::clone(&flow).run(order).await.unwrap(), expected);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_resumes_after_every_step() {
    let dir = std::env::temp_dir().join(unique("idem-steps"));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}/records.db", dir.display());
    resumes_after_every_step(Arc::new(SqliteStore::connect(&url).await.unwrap())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_resumes_after_every_step() {
    resumes_after_every_step(Arc::new(
        PostgresStore::connect(&postgres_url()).await.unwrap(),
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_resumes_after_every_step() {
    resumes_after_every_step(Arc::new(RedisStore::connect(&redis_url()).await.unwrap())).await;
}

/// For each pair of adjacent steps: a worker process runs the checkout and is
/// killed between the two; the retry here waits out the dead holder's lease,
/// replays the steps it recorded (their values name the dead process) and runs
/// the rest. Every effect is made once, and every later call replays.
async fn killed_between_steps(kind: &str, url: &str, store: Arc<dyn Store>) {
    use idem_tests::steps::{Flow, STEPS};
    use std::io::{BufRead as _, BufReader};
    for stop_after in 0..STEPS.len() - 1 {
        let key = unique("kill-steps");
        let effects = std::env::temp_dir().join(format!("{key}.effects"));
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_idem-test-worker"))
            .args([
                "steps",
                kind,
                url,
                effects.to_str().unwrap(),
                &key,
                &stop_after.to_string(),
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("worker");
        let worker = child.id();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "{kind}: the worker said {line:?}");
        child.kill().expect("SIGKILL");
        child.wait().unwrap();

        let flow = Flow {
            store: Arc::clone(&store),
            effects: effects.clone(),
            stop_after: None,
        };
        let out = flow.run(key.clone()).await.unwrap();
        let me = std::process::id();
        let expected: Vec<String> = STEPS
            .iter()
            .enumerate()
            .map(|(i, s)| format!("{s}@{}", if i <= stop_after { worker } else { me }))
            .collect();
        assert_eq!(
            out,
            expected.join("/"),
            "{kind}, killed after step {stop_after}"
        );
        let made = std::fs::read_to_string(&effects).unwrap();
        for name in STEPS {
            let times = made
                .lines()
                .filter(|l| *l == format!("{name} {key}"))
                .count();
            assert_eq!(
                times, 1,
                "{kind}, killed after step {stop_after}: {name} made {times} times"
            );
        }
        assert_eq!(flow.run(key).await.unwrap(), out, "a later call replays");
        std::fs::remove_file(effects).ok();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_process_killed_between_steps() {
    let dir = std::env::temp_dir().join(unique("idem-kill-steps"));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}/records.db", dir.display());
    let store = Arc::new(SqliteStore::connect(&url).await.unwrap());
    killed_between_steps("sqlite", &url, store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_process_killed_between_steps() {
    let url = postgres_url();
    let store = Arc::new(PostgresStore::connect(&url).await.unwrap());
    killed_between_steps("postgres", &url, store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_process_killed_between_steps() {
    let url = redis_url();
    let store = Arc::new(RedisStore::connect(&url).await.unwrap());
    killed_between_steps("redis", &url, store).await;
}

// Found by the break-it review of steps (each failed before its fix).

/// The SQLite table as idem made it before steps.
pub(crate) const OLD_SQLITE_SCHEMA: [&str; 2] = [
    "CREATE TABLE idem_records (
        key         TEXT NOT NULL PRIMARY KEY,
        state       TEXT NOT NULL CHECK (state IN ('processing', 'completed', 'released')),
        token       INTEGER NOT NULL,
        fingerprint BLOB,
        outcome     TEXT,
        expires_at  INTEGER NOT NULL,
        took_over   INTEGER NOT NULL DEFAULT 0,
        created_at  INTEGER NOT NULL,
        updated_at  INTEGER NOT NULL
    ) WITHOUT ROWID",
    "CREATE INDEX idem_records_expires_at ON idem_records (expires_at)",
];

/// The PostgreSQL table as idem made it before steps.
pub(crate) fn old_pg_schema(t: &str) -> Vec<String> {
    vec![
        format!(
            "CREATE TABLE {t} (
                key         TEXT PRIMARY KEY,
                state       TEXT NOT NULL CHECK (state IN ('processing', 'completed')),
                token       BIGINT NOT NULL,
                fingerprint BYTEA,
                outcome     TEXT,
                expires_at  TIMESTAMPTZ NOT NULL,
                created_at  TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
                updated_at  TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
            )"
        ),
        format!("CREATE INDEX {t}_expires_at ON {t} (expires_at)"),
        format!("CREATE SEQUENCE {t}_token_seq"),
    ]
}

async fn run_all(pool: &sqlx::PgPool, statements: impl IntoIterator<Item = String>) {
    for s in statements {
        sqlx::query(sqlx::AssertSqlSafe(s))
            .execute(pool)
            .await
            .unwrap();
    }
}

fn drop_table(t: &str) -> [String; 2] {
    [
        format!("DROP TABLE {t}"),
        format!("DROP SEQUENCE {t}_token_seq"),
    ]
}

fn claim_request(key: &str) -> idem_runtime::ClaimRequest<'_> {
    idem_runtime::ClaimRequest {
        key,
        fingerprint: None,
        lease: Duration::from_secs(60),
    }
}

/// Services in several processes upgrading one old table at once: one
/// migrates (locking the table once, first), the others find it done; no
/// call fails, none deadlocks with another's claims.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_services_upgrading_one_old_table_at_once_all_answer() {
    let admin = sqlx::PgPool::connect(&postgres_url()).await.unwrap();
    for _ in 0..3 {
        let t = unique("old_concurrent");
        run_all(&admin, old_pg_schema(&t)).await;
        let calls: Vec<_> = (0..4)
            .map(|_| {
                let t = t.clone();
                tokio::spawn(async move {
                    let pool = sqlx::postgres::PgPoolOptions::new()
                        .max_connections(2)
                        .connect(&postgres_url())
                        .await
                        .unwrap();
                    let store = PostgresStore::with_table(pool, &t).unwrap();
                    for _ in 0..5 {
                        store.claim(claim_request(&unique("k"))).await?;
                    }
                    Ok::<_, idem_runtime::Error>(())
                })
            })
            .collect();
        for call in calls {
            call.await.unwrap().unwrap();
        }
        run_all(&admin, drop_table(&t)).await;
    }
}

/// A role that may only read and write rows, on a table from before steps:
/// its calls fail with an error that says what to run, and once a role that
/// may alter the table has migrated it, they work.
#[tokio::test]
async fn postgres_an_old_table_and_a_role_without_ddl_rights_get_a_clear_error() {
    let admin = sqlx::PgPool::connect(&postgres_url()).await.unwrap();
    let t = unique("old_dml_only");
    run_all(&admin, old_pg_schema(&t)).await;
    let role = "idem_steps_dml_only";
    run_all(
        &admin,
        [
            format!(
                "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role}') \
                 THEN CREATE ROLE {role} LOGIN; END IF; END $$"
            ),
            format!("GRANT SELECT, INSERT, UPDATE, DELETE ON {t} TO {role}"),
            format!("GRANT USAGE, SELECT, UPDATE ON SEQUENCE {t}_token_seq TO {role}"),
        ],
    )
    .await;
    let url = postgres_url().replace("postgres@", &format!("{role}@"));
    let app = PostgresStore::with_table(sqlx::PgPool::connect(&url).await.unwrap(), &t).unwrap();
    match app.claim(claim_request("k")).await {
        Err(err) => {
            let message = err.to_string();
            assert!(message.contains("PostgresStore::migrate()"), "{message}");
        }
        Ok(claim) => panic!("an old table cannot be used unmigrated: {claim:?}"),
    }
    PostgresStore::with_table(admin.clone(), &t)
        .unwrap()
        .migrate()
        .await
        .unwrap();
    let app = PostgresStore::with_table(sqlx::PgPool::connect(&url).await.unwrap(), &t).unwrap();
    assert!(matches!(
        app.claim(claim_request("k")).await,
        Ok(idem_runtime::Claim::Acquired { .. })
    ));
    run_all(&admin, drop_table(&t)).await;
}

/// Several services opening one SQLite file from before steps at once: the
/// migration takes the write lock first, so none fails busy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_services_upgrading_one_old_file_at_once_all_open() {
    for _ in 0..5 {
        let dir = std::env::temp_dir().join(unique("idem-old-sqlite"));
        std::fs::create_dir_all(&dir).unwrap();
        let url = format!("sqlite://{}/records.db?mode=rwc", dir.display());
        {
            let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
            for s in ["PRAGMA journal_mode=WAL"]
                .into_iter()
                .chain(OLD_SQLITE_SCHEMA)
            {
                sqlx::query(s).execute(&pool).await.unwrap();
            }
            pool.close().await;
        }
        let opens: Vec<_> = (0..4)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move { SqliteStore::connect(&url).await.map(|_| ()) })
            })
            .collect();
        for open in opens {
            open.await.unwrap().unwrap();
        }
    }
}

/// A holder's step record that commits while its own release waits for the
/// row (a step dropped while its write was on the wire, then the drop's
/// release): the release still lands, and a retry runs at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_release_waiting_on_its_own_step_record_lands() {
    let store = PostgresStore::connect(&postgres_url()).await.unwrap();
    let key = unique("release-race");
    let token = match store.claim(claim_request(&key)).await.unwrap() {
        idem_runtime::Claim::Acquired { token, .. } => token,
        other => panic!("{other:?}"),
    };
    // The step's write, held open in a transaction (a slow commit).
    let mut tx = store.pool().begin().await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE {} SET steps = '{{\"0\":[\"\\\"a\\\"\",\"{{\\\"ok\\\":1}}\"]}}'::jsonb,
                steps_until = clock_timestamp() + interval '1 hour'
          WHERE key = $1 AND token = $2 AND state = 'processing'",
        store.table()
    )))
    .bind(&key)
    .bind(token.0 as i64)
    .execute(&mut *tx)
    .await
    .unwrap();
    let (s, k) = (store.clone(), key.clone());
    let release = tokio::spawn(async move { s.release(&k, token).await });
    // Until the release waits for the row lock the open write holds.
    loop {
        let waiting: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
                             WHERE wait_event_type = 'Lock' AND query LIKE '%state = ''released''%')",
        )
        .fetch_one(store.pool())
        .await
        .unwrap();
        if waiting {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tx.commit().await.unwrap();
    release.await.unwrap().unwrap();
    assert!(store.get(&key).await.unwrap().is_none(), "released");
    match store.claim(claim_request(&key)).await.unwrap() {
        idem_runtime::Claim::Acquired { took_over, .. } => assert!(took_over, "its step is kept"),
        other => panic!("{other:?}"),
    }
}

/// Where an attempt of the atomic-phases flow stops.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Stop {
    Nowhere,
    /// Phase `n`'s writes made, then it fails before its commit (as a crash
    /// there: its transaction, writes and step record with it, vanishes).
    BeforeCommit(u8),
    /// Phase `n` committed, then the attempt fails.
    AfterCommit(u8),
}

macro_rules! phases {
    ($name:ident, $store:ty, $db:ty, $insert:literal) => {
        struct $name {
            store: $store,
            notified: AtomicUsize,
        }

        impl $name {
            #[idempotent(key = order, name = "atomic-phases", store = self.store)]
            async fn run(&self, order: String, stop: Stop) -> Result<i64, AppError> {
                let mut total = 0;
                for (n, phase) in [(1u8, "reserve"), (2, "ship")] {
                    let order = order.clone();
                    let id = idem_runtime::step_in_tx(phase, &self.store, |tx| {
                        Box::pin(async move {
                            let id = sqlx::query_scalar::<_, i64>($insert)
                                .bind(&order)
                                .bind(phase)
                                .fetch_one(&mut **tx)
                                .await
                                .map_err(|_| AppError::Down)?;
                            if stop == Stop::BeforeCommit(n) {
                                return Err(AppError::Down);
                            }
                            Ok(id)
                        })
                    })
                    .await?;
                    if stop == Stop::AfterCommit(n) {
                        return Err(AppError::Down);
                    }
                    total += id;
                }
                // A plain step after the phases: nothing of theirs is left
                // uncommitted to wait for.
                step("notify", async {
                    Ok::<_, AppError>(self.notified.fetch_add(1, Ordering::SeqCst))
                })
                .await?;
                Ok(total)
            }
        }
    };
}

phases!(
    SqlitePhases,
    SqliteStore,
    sqlx::Sqlite,
    "INSERT INTO phase_rows (order_ref, phase) VALUES (?1, ?2) RETURNING id"
);
phases!(
    PgPhases,
    PostgresStore,
    sqlx::Postgres,
    "INSERT INTO phase_rows (order_ref, phase) VALUES ($1, $2) RETURNING id"
);

/// Stops `flow` at each of [`STOPS`] (the first attempt spawned: a call that
/// runs phases is a `Send` future), retries, and checks each phase's rows
/// (`$param`: the database's first placeholder) and the replay.
macro_rules! check_stops {
    ($flow:ident, $param:literal) => {
        for stop in STOPS {
            let order = unique("phases");
            let spawned = tokio::spawn({
                let (flow, order) = (Arc::clone(&$flow), order.clone());
                async move { flow.run(order, stop).await }
            });
            assert!(spawned.await.unwrap().is_err(), "{stop:?}");
            let total = $flow.run(order.clone(), Stop::Nowhere).await.unwrap();
            let rows: Vec<(String, i64)> = sqlx::query_as(concat!(
                "SELECT phase, count(*) FROM phase_rows WHERE order_ref = ",
                $param,
                " GROUP BY phase ORDER BY phase"
            ))
            .bind(&order)
            .fetch_all($flow.store.pool())
            .await
            .unwrap();
            assert_eq!(
                rows,
                vec![("reserve".into(), 1), ("ship".into(), 1)],
                "{stop:?}"
            );
            assert_eq!(
                $flow.run(order, Stop::Nowhere).await.unwrap(),
                total,
                "replayed"
            );
        }
    };
}

const STOPS: [Stop; 4] = [
    Stop::BeforeCommit(1),
    Stop::AfterCommit(1),
    Stop::BeforeCommit(2),
    Stop::AfterCommit(2),
];

async fn sqlite_phases(url: &str) {
    let flow = Arc::new(SqlitePhases {
        store: SqliteStore::connect(url).await.unwrap(),
        notified: AtomicUsize::new(0),
    });
    sqlx::query(
        "CREATE TABLE phase_rows (id INTEGER PRIMARY KEY AUTOINCREMENT, order_ref TEXT, phase TEXT)",
    )
    .execute(flow.store.pool())
    .await
    .unwrap();
    check_stops!(flow, "?1");
    assert_eq!(flow.notified.load(Ordering::SeqCst), STOPS.len());
}

/// Atomic phases (`step_in_tx`): whether an attempt stops before or after a
/// phase's commit, every phase's writes exist exactly once after the retry,
/// and the retry's answer counts each once; a plain step after the phases
/// waits for nothing. On a file, and on an in-memory database (one
/// connection: a resumed phase reads the earlier steps before it takes it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_atomic_phases_leave_a_recovery_point() {
    let dir = std::env::temp_dir().join(unique("idem-phases"));
    std::fs::create_dir_all(&dir).unwrap();
    sqlite_phases(&format!("sqlite://{}/records.db", dir.display())).await;
    sqlite_phases("sqlite::memory:").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_atomic_phases_leave_a_recovery_point() {
    let flow = Arc::new(PgPhases {
        store: PostgresStore::connect(&postgres_url()).await.unwrap(),
        notified: AtomicUsize::new(0),
    });
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS phase_rows (id BIGSERIAL PRIMARY KEY, order_ref TEXT, phase TEXT)",
    )
    .execute(flow.store.pool())
    .await
    .unwrap();
    check_stops!(flow, "$1");
}
