//! A separate OS process for the tests: `hold` places an order inside a
//! transaction and never commits (the test kills it with SIGKILL); `hammer`
//! runs many concurrent duplicate callers against PostgreSQL and prints what
//! each one got, one JSON line per call; `consume-nats` and `consume-kafka`
//! consume messages into PostgreSQL until killed; `steps` runs a checkout's
//! steps on a store and hangs after the one it is told (the test kills it).

use std::io::Write as _;
use std::process::ExitCode;
use std::sync::Arc;

use idem_tests::{PgOrders, RedisOrders, SqliteOrders};

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["consume-nats", stream, consumer, table] => {
            // Keys in the namespace of the stream, as the test's own consumers.
            let effects = idem_tests::nats::Effects::setup(table, stream).await;
            let js = idem_tests::nats::jetstream().await;
            let consumer: async_nats::jetstream::consumer::PullConsumer = js
                .get_stream(stream)
                .await
                .expect("stream")
                .get_consumer(consumer)
                .await
                .expect("consumer");
            ready(0);
            match effects.consume(&consumer).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("consume-nats: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        ["consume-kafka", topic, group, table, namespace] => {
            let effects = idem_tests::kafka::Effects::setup(table, namespace).await;
            let consumer = idem_tests::kafka::consumer(group, topic);
            ready(0);
            match effects.consume(&consumer).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("consume-kafka: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        ["steps", kind, url, effects, key, stop_after] => {
            let store: Arc<dyn idem_runtime::Store> = match *kind {
                "sqlite" => Arc::new(
                    idem_runtime::SqliteStore::connect(url)
                        .await
                        .expect("sqlite"),
                ),
                "postgres" => Arc::new(
                    idem_runtime::PostgresStore::connect(url)
                        .await
                        .expect("postgres"),
                ),
                "redis" => Arc::new(idem_runtime::RedisStore::connect(url).await.expect("redis")),
                other => panic!("unknown store {other}"),
            };
            let flow = idem_tests::steps::Flow {
                store,
                effects: effects.into(),
                stop_after: Some(stop_after.parse().expect("stop_after")),
            };
            // Hangs after its step, until killed.
            match flow.run(key.to_string()).await {
                Ok(out) => {
                    eprintln!("steps: finished without stopping: {out}");
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("steps: {e:?}");
                    ExitCode::FAILURE
                }
            }
        }
        ["hold", "postgres", orders, order_ref] => {
            let svc = PgOrders::setup(orders).await;
            let mut tx = svc.store.pool().begin().await.expect("begin");
            let id = svc.place(&mut tx, order_ref).await.expect("place");
            ready(id);
            hang(tx).await
        }
        ["hold", "sqlite", url, orders, order_ref] => {
            let svc = SqliteOrders::setup(url, orders).await;
            let mut tx = svc.store.pool().begin().await.expect("begin");
            let id = svc.place(&mut tx, order_ref).await.expect("place");
            ready(id);
            hang(tx).await
        }
        ["hammer-redis", url, orders, prefix, tasks, keys] => {
            let tasks: usize = tasks.parse().expect("tasks");
            let keys: usize = keys.parse().expect("keys");
            let svc = Arc::new(RedisOrders::setup(url, orders).await);
            let calls: Vec<_> = (0..tasks)
                .map(|i| {
                    let svc = svc.clone();
                    let key = format!("{prefix}-{}", i % keys);
                    tokio::spawn(async move {
                        let id = svc.place(&key).await;
                        Ok::<_, sqlx::Error>((key, id))
                    })
                })
                .collect();
            report(calls).await
        }
        ["hammer", orders, prefix, tasks, keys] => {
            let tasks: usize = tasks.parse().expect("tasks");
            let keys: usize = keys.parse().expect("keys");
            let svc = Arc::new(PgOrders::setup(orders).await);
            let calls: Vec<_> = (0..tasks)
                .map(|i| {
                    let svc = svc.clone();
                    let key = format!("{prefix}-{}", i % keys);
                    tokio::spawn(async move {
                        let mut tx = svc.store.pool().begin().await?;
                        let id = svc.place(&mut tx, &key).await;
                        if id.is_ok() {
                            tx.commit().await?;
                        }
                        Ok::<_, sqlx::Error>((key, id))
                    })
                })
                .collect();
            report(calls).await
        }
        _ => {
            eprintln!(
                "usage: idem-test-worker hold postgres ORDERS REF | hold sqlite URL ORDERS REF | hammer ORDERS PREFIX TASKS KEYS | hammer-redis URL ORDERS PREFIX TASKS KEYS"
            );
            ExitCode::from(2)
        }
    }
}

/// What one hammering task reports: its key and what its call returned.
type Call =
    tokio::task::JoinHandle<Result<(String, Result<i64, idem_tests::AppError>), sqlx::Error>>;

/// Prints one JSON line per call; fails if any call failed.
async fn report(calls: Vec<Call>) -> ExitCode {
    let mut failed = false;
    let mut out = std::io::stdout().lock();
    for call in calls {
        let line = match call.await.expect("task") {
            Ok((key, Ok(id))) => serde_json::json!({"key": key, "id": id}),
            Ok((key, Err(e))) => {
                failed = true;
                serde_json::json!({"key": key, "error": format!("{e:?}")})
            }
            Err(e) => {
                failed = true;
                serde_json::json!({"error": e.to_string()})
            }
        };
        writeln!(out, "{line}").unwrap();
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn ready(id: i64) {
    println!("ready {id}");
    std::io::stdout().flush().unwrap();
}

/// Keeps the transaction open until the process is killed.
async fn hang<T>(tx: T) -> ExitCode {
    tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
    drop(tx);
    ExitCode::FAILURE
}
