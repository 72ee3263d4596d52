//! The shared store conformance suite, run against every store in this build.
//! A new store is one more line here.

use std::str::FromStr as _;
use std::sync::Arc;
use std::time::Duration;

use idem_runtime::testing::{conformance, step_conformance};
use idem_runtime::{
    Claim, ClaimRequest, MemoryStore, PostgresStore, RedisStore, SqliteStore, Store,
};

/// The PostgreSQL the tests use: `IDEM_POSTGRES_URL`, or the local server.
pub fn postgres_url() -> String {
    std::env::var("IDEM_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

#[tokio::test]
async fn postgres_store() {
    let store = PostgresStore::connect(&postgres_url()).await.unwrap();
    conformance(&store).await;
}

#[tokio::test]
async fn postgres_store_in_its_own_table() {
    let pool = sqlx::PgPool::connect(&postgres_url()).await.unwrap();
    let store = PostgresStore::with_table(pool, "idem_conformance_custom").unwrap();
    conformance(&store).await;
}

#[tokio::test]
async fn postgres_store_keeps_steps() {
    let store = PostgresStore::connect(&postgres_url()).await.unwrap();
    step_conformance(&store).await;
}

/// A table made by an idem from before steps (no step columns, a state check
/// without `released`) is migrated on first use, its records kept.
#[tokio::test]
async fn postgres_table_from_before_steps_is_migrated() {
    let pool = sqlx::PgPool::connect(&postgres_url()).await.unwrap();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let t = format!("idem_before_steps_{nanos}");
    let old_record = format!(
        "INSERT INTO {t} (key, state, token, outcome, expires_at)
         VALUES ('old:1', 'completed', 1, '{{\"ok\":7}}', now() + interval '1 hour')"
    );
    for statement in crate::steps::old_pg_schema(&t)
        .into_iter()
        .chain([old_record])
    {
        sqlx::query(sqlx::AssertSqlSafe(statement))
            .execute(&pool)
            .await
            .unwrap();
    }
    let store = PostgresStore::with_table(pool.clone(), &t).unwrap();
    match store
        .claim(ClaimRequest {
            key: "old:1",
            fingerprint: None,
            lease: Duration::from_secs(5),
        })
        .await
    {
        Ok(Claim::Completed { outcome, .. }) => assert_eq!(outcome, br#"{"ok":7}"#),
        other => panic!("the old record must replay, got {other:?}"),
    }
    conformance(&store).await;
    step_conformance(&store).await;
    // A second store on the migrated table takes no migration lock.
    let again = PostgresStore::with_table(pool.clone(), &t).unwrap();
    step_conformance(&again).await;
    for drop in [
        format!("DROP TABLE {t}"),
        format!("DROP SEQUENCE {t}_token_seq"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(drop))
            .execute(&pool)
            .await
            .unwrap();
    }
}

/// The Redis the tests use: `IDEM_REDIS_URL`, or the local server.
pub fn redis_url() -> String {
    std::env::var("IDEM_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The cluster `scripts/redis-cluster.sh` starts: `IDEM_REDIS_CLUSTER`, or its default ports.
pub fn redis_cluster() -> Vec<String> {
    std::env::var("IDEM_REDIS_CLUSTER")
        .unwrap_or_else(|_| {
            "redis://127.0.0.1:7101,redis://127.0.0.1:7102,redis://127.0.0.1:7103".into()
        })
        .split(',')
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn redis_store() {
    conformance(&RedisStore::connect(&redis_url()).await.unwrap()).await;
}

#[tokio::test]
async fn redis_store_keeps_steps() {
    let store = RedisStore::connect(&redis_url()).await.unwrap();
    step_conformance(&store).await;
    step_conformance(&idem_runtime::ReplayCache::new(store, 1000)).await;
    let cluster = RedisStore::connect_cluster(&redis_cluster()).await.unwrap();
    step_conformance(&cluster).await;
}

#[tokio::test]
async fn redis_store_behind_a_replay_cache() {
    let store = RedisStore::connect(&redis_url()).await.unwrap();
    conformance(&idem_runtime::ReplayCache::new(store, 1000)).await;
}

#[tokio::test]
async fn memory_store_behind_a_replay_cache() {
    conformance(&idem_runtime::ReplayCache::new(MemoryStore::new(), 1000)).await;
}

#[tokio::test]
async fn redis_cluster_store() {
    let store = RedisStore::connect_cluster(&redis_cluster()).await.unwrap();
    conformance(&store).await;
}

#[tokio::test]
async fn redis_cluster_records_land_on_every_master() {
    let nodes = redis_cluster();
    let store = RedisStore::connect_cluster(&nodes)
        .await
        .unwrap()
        .with_prefix("idem-spread:");
    for i in 0..60 {
        let key = format!("spread:{i}:{}", std::process::id());
        let req = ClaimRequest {
            key: &key,
            fingerprint: None,
            lease: Duration::from_secs(60),
        };
        if let Claim::Acquired { token, .. } = store.claim(req).await.unwrap() {
            store
                .complete(&key, token, b"{\"ok\":1}", Duration::from_secs(30))
                .await
                .unwrap();
        }
        assert!(matches!(
            store.claim(req).await.unwrap(),
            Claim::Completed { .. }
        ));
    }
    for node in &nodes {
        let client = redis::Client::open(node.as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("idem-spread:*")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(
            !keys.is_empty(),
            "no records landed on the master at {node}"
        );
    }
}

#[tokio::test]
async fn sqlite_store_in_a_file() {
    let dir = tempdir("conformance");
    let url = format!("sqlite://{}/records.db", dir.display());
    conformance(&SqliteStore::connect(&url).await.unwrap()).await;
}

#[tokio::test]
async fn sqlite_store_in_memory() {
    conformance(&SqliteStore::connect("sqlite::memory:").await.unwrap()).await;
}

#[tokio::test]
async fn sqlite_store_keeps_steps() {
    let dir = tempdir("steps");
    let url = format!("sqlite://{}/records.db", dir.display());
    step_conformance(&SqliteStore::connect(&url).await.unwrap()).await;
    step_conformance(&SqliteStore::connect("sqlite::memory:").await.unwrap()).await;
}

/// A file made by an idem from before steps (no step columns) is migrated on
/// first use, its records kept.
#[tokio::test]
async fn sqlite_file_from_before_steps_is_migrated() {
    let dir = tempdir("before-steps");
    let url = format!("sqlite://{}/records.db", dir.display());
    {
        let options = sqlx::sqlite::SqliteConnectOptions::from_str(&url)
            .unwrap()
            .create_if_missing(true);
        let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
        let old_record = "INSERT INTO idem_records VALUES \
            ('old:1', 'completed', 1, NULL, '{\"ok\":7}', 99999999999999, 0, 0, 0)";
        for statement in crate::steps::OLD_SQLITE_SCHEMA
            .into_iter()
            .chain([old_record])
        {
            sqlx::query(statement).execute(&pool).await.unwrap();
        }
        pool.close().await;
    }
    let store = SqliteStore::connect(&url).await.unwrap();
    match store
        .claim(ClaimRequest {
            key: "old:1",
            fingerprint: None,
            lease: Duration::from_secs(5),
        })
        .await
    {
        Ok(Claim::Completed { outcome, .. }) => assert_eq!(outcome, br#"{"ok":7}"#),
        other => panic!("the old record must replay, got {other:?}"),
    }
    conformance(&store).await;
    step_conformance(&store).await;
}

/// A fresh directory under the target dir for one test's files.
fn tempdir(name: &str) -> std::path::PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{name}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn memory_store() {
    conformance(&MemoryStore::new()).await;
}

#[tokio::test]
async fn memory_store_keeps_steps() {
    step_conformance(&MemoryStore::new()).await;
    let store: Arc<dyn Store> = Arc::new(MemoryStore::with_shards(1));
    step_conformance(&store).await;
    step_conformance(&idem_runtime::ReplayCache::new(MemoryStore::new(), 1000)).await;
}

#[tokio::test]
async fn memory_store_behind_arc_dyn_store() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::with_shards(1));
    conformance(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_store_claims_race_across_threads() {
    let store = MemoryStore::new();
    for round in 0..20 {
        let key = format!("race:{round}");
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let store = store.clone();
                let key = key.clone();
                tokio::spawn(async move {
                    let req = ClaimRequest {
                        key: &key,
                        fingerprint: None,
                        lease: Duration::from_secs(60),
                    };
                    store.claim(req).await.unwrap()
                })
            })
            .collect();
        let mut won = 0;
        for t in tasks {
            if matches!(t.await.unwrap(), Claim::Acquired { .. }) {
                won += 1;
            }
        }
        assert_eq!(won, 1, "round {round}: exactly one winner");
    }
}

#[tokio::test(start_paused = true)]
async fn memory_store_sweeps_expired_records_as_it_is_used() {
    let store = MemoryStore::with_shards(1);
    let claim = |key: String| {
        let store = store.clone();
        async move {
            let req = ClaimRequest {
                key: &key,
                fingerprint: None,
                lease: Duration::from_secs(1),
            };
            match store.claim(req).await.unwrap() {
                Claim::Acquired { token, .. } => store
                    .complete(&key, token, b"{\"ok\":1}", Duration::from_secs(1))
                    .await
                    .unwrap(),
                other => panic!("{other:?}"),
            }
        }
    };
    for i in 0..10_000 {
        claim(format!("old:{i}")).await;
    }
    assert_eq!(store.len(), 10_000);
    tokio::time::advance(Duration::from_secs(2)).await;
    // A shard is swept at least once per max(1,024, its size) claims.
    for i in 0..10_000 {
        claim(format!("new:{i}")).await;
    }
    assert_eq!(
        store.len(),
        10_000,
        "every expired record was swept without an explicit purge; only the live ones remain"
    );
}
