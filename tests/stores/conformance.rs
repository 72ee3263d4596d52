//! The shared store conformance suite, run against every store in this build.
//! A new store is one more line here.

use std::sync::Arc;
use std::time::Duration;

use idem_runtime::testing::conformance;
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
