//! What `RedisStore` costs next to the raw floor, measured in one run against
//! the same server.
//!
//! - `fresh`: a call through `#[idempotent]` with a new key (claim script, run,
//!   complete script) vs the floor of two plain round trips, `SET key v NX PX`
//!   then `SET key v PX`;
//! - `replay`: a call whose key is completed vs one plain `GET`;
//! - `cached replay`: the same replay through a [`ReplayCache`], served from
//!   process memory.
//!
//! Each sequentially and from 64 concurrent tasks (one multiplexed connection).
//! Run: `cargo bench -p idem-runtime --bench redis --features redis`
//! (`IDEM_REDIS_URL` overrides the server; `IDEM_BENCH_OPS` the calls per figure;
//! `IDEM_BENCH_ONLY=replay` runs only the lines whose label contains it).

use std::sync::Arc;

use idem_runtime::{RedisStore, ReplayCache};
use redis::aio::MultiplexedConnection;

mod common;

use common::{compare, Svc};

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let ops = common::ops(20_000);
    let url = std::env::var("IDEM_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = redis::Client::open(url.as_str()).unwrap();
        let conn: MultiplexedConnection = client.get_multiplexed_async_connection().await.unwrap();
        let store = RedisStore::connect(&url)
            .await
            .unwrap()
            .with_prefix("idem-bench:");
        let svc = Arc::new(Svc {
            store: store.clone(),
        });
        let cached = Arc::new(Svc {
            store: ReplayCache::new(store, 10_000),
        });
        svc.call(u64::MAX).await.unwrap();
        cached.call(u64::MAX).await.unwrap();
        cached.call(u64::MAX).await.unwrap();
        let mut c = conn.clone();
        let _: () = redis::cmd("SET")
            .arg("idem-floor:replayed")
            .arg(r#"{"ok":1}"#)
            .query_async(&mut c)
            .await
            .unwrap();
        println!("{ops} calls per figure (x4 for replays); best of 5 rounds\n");

        for tasks in [1, 64] {
            let c = conn.clone();
            let floor = move |_| {
                let mut c = c.clone();
                async move {
                    let _: Option<String> = redis::cmd("GET")
                        .arg("idem-floor:replayed")
                        .query_async(&mut c)
                        .await
                        .unwrap();
                }
            };
            let s = svc.clone();
            let idem = move |_| {
                let s = s.clone();
                async move {
                    s.call(u64::MAX).await.unwrap();
                }
            };
            compare(
                &format!("replay, {tasks} task(s)"),
                ops * 4,
                tasks,
                floor.clone(),
                idem.clone(),
            )
            .await;

            // For reading the figure above: a script round trip that only GETs.
            let c = conn.clone();
            let get_script = Arc::new(redis::Script::new("return redis.call('GET', KEYS[1])"));
            let script_floor = move |_| {
                let mut c = c.clone();
                let script = get_script.clone();
                async move {
                    let _: Option<String> = script
                        .key("idem-floor:replayed")
                        .invoke_async(&mut c)
                        .await
                        .unwrap();
                }
            };
            compare(
                "  (replay vs GET-only script)",
                ops * 4,
                tasks,
                script_floor,
                idem,
            )
            .await;

            let s = cached.clone();
            let idem = move |_| {
                let s = s.clone();
                async move {
                    s.call(u64::MAX).await.unwrap();
                }
            };
            compare(
                &format!("cached replay, {tasks} task(s)"),
                ops * 4,
                tasks,
                floor,
                idem,
            )
            .await;

            let c = conn.clone();
            let floor = move |id: u64| {
                let mut c = c.clone();
                async move {
                    let key = format!("idem-floor:{id:064x}");
                    let _: Option<String> = redis::cmd("SET")
                        .arg(&key)
                        .arg("p")
                        .arg("NX")
                        .arg("PX")
                        .arg(30_000)
                        .query_async(&mut c)
                        .await
                        .unwrap();
                    let _: () = redis::cmd("SET")
                        .arg(&key)
                        .arg(r#"{"ok":1}"#)
                        .arg("PX")
                        .arg(60_000)
                        .query_async(&mut c)
                        .await
                        .unwrap();
                }
            };
            let s = svc.clone();
            let idem = move |id: u64| {
                let s = s.clone();
                async move {
                    s.call(id).await.unwrap();
                }
            };
            compare(&format!("fresh, {tasks} task(s)"), ops, tasks, floor, idem).await;
        }
    });
}
