//! The admin conformance suite (`idem_runtime::testing::admin_conformance`)
//! on every store idem ships, each on the real server.

mod support;

use idem_runtime::testing::admin_conformance;
use idem_runtime::{MemoryStore, RedisStore, SqliteStore};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory() {
    admin_conformance(&MemoryStore::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite() {
    let dir = std::env::temp_dir().join(support::unique("idem_cli_admin"));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}", dir.join("records.db").display());
    admin_conformance(&SqliteStore::connect(&url).await.unwrap()).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres() {
    let (store, pool, table) = support::pg_table("admin").await;
    admin_conformance(&store).await;
    support::drop_pg_table(&pool, &table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis() {
    let prefix = format!("{}:", support::unique("idem_admin"));
    let store = RedisStore::connect(&support::redis_url())
        .await
        .unwrap()
        .with_prefix(&prefix);
    admin_conformance(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster() {
    let prefix = format!("{}:", support::unique("idem_admin"));
    let store = RedisStore::connect_cluster(&support::cluster_nodes())
        .await
        .expect("the test cluster: ./scripts/redis-cluster.sh start")
        .with_prefix(&prefix);
    admin_conformance(&store).await;
}
