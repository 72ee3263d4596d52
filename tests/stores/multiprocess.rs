//! Exactly once across OS processes: 4 processes × 50 tasks hammer the same 20
//! keys, on PostgreSQL and on Redis. Each key's body ran once (every execution
//! writes one order row in PostgreSQL, in the claim's transaction on
//! PostgreSQL, so the orders table counts executions), and every one of the
//! 200 callers got that one result.

use std::collections::HashMap;
use std::process::{Command, Stdio};

use idem_tests::{redis_url, unique, PgOrders, RedisOrders};

const PROCESSES: usize = 4;
const TASKS: usize = 50;
const KEYS: usize = 20;

/// Runs `PROCESSES` workers with `args` and collects each key's results.
fn hammer(args: &[&str]) -> HashMap<String, Vec<i64>> {
    let workers: Vec<_> = (0..PROCESSES)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_idem-test-worker"))
                .args(args)
                .arg(TASKS.to_string())
                .arg(KEYS.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("worker")
        })
        .collect();
    let mut results: HashMap<String, Vec<i64>> = HashMap::new();
    for worker in workers {
        let out = worker.wait_with_output().unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(out.status.success(), "a worker failed:\n{text}");
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let key = v["key"].as_str().unwrap().to_owned();
            results
                .entry(key)
                .or_default()
                .push(v["id"].as_i64().unwrap());
        }
    }
    assert_eq!(results.len(), KEYS);
    assert_eq!(
        results.values().map(Vec::len).sum::<usize>(),
        PROCESSES * TASKS
    );
    for (key, ids) in &results {
        assert!(
            ids.iter().all(|id| *id == ids[0]),
            "{key}: callers got different results {ids:?}"
        );
    }
    results
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_four_processes_one_execution_per_key() {
    let svc = PgOrders::setup("orders_multiprocess").await;
    let prefix = unique("mp");
    for key in hammer(&["hammer", "orders_multiprocess", &prefix]).keys() {
        assert_eq!(
            svc.count(key).await,
            1,
            "{key}: the body ran more than once"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_four_processes_one_execution_per_key() {
    let svc = RedisOrders::setup(&redis_url(), "orders_multiprocess_redis").await;
    let prefix = unique("mp-redis");
    let url = redis_url();
    for key in hammer(&["hammer-redis", &url, "orders_multiprocess_redis", &prefix]).keys() {
        assert_eq!(
            svc.count(key).await,
            1,
            "{key}: the body ran more than once"
        );
    }
}
