//! Exactly once across OS processes: 4 processes × 50 tasks hammer the same 20
//! keys on PostgreSQL. Each key's body ran once (its order row is written in
//! the same transaction as the claim, so the orders table counts executions),
//! and every one of the 200 callers got that one result.

use std::collections::HashMap;
use std::process::{Command, Stdio};

use idem_tests::{unique, PgOrders};

const PROCESSES: usize = 4;
const TASKS: usize = 50;
const KEYS: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_processes_one_execution_per_key() {
    let svc = PgOrders::setup("orders_multiprocess").await;
    let prefix = unique("mp");
    let workers: Vec<_> = (0..PROCESSES)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_idem-sql-worker"))
                .args(["hammer", "orders_multiprocess", &prefix])
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
        assert_eq!(
            svc.count(key).await,
            1,
            "{key}: the body ran more than once"
        );
    }
}
