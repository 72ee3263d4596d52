//! What `#[idempotent]` adds to a call, with `MemoryStore`.
//!
//! Four measurements, all in this one run:
//! - `plain`: the same async body, called directly (no idempotency);
//! - `floor`: the raw backend floor, one `Mutex<HashMap>` insert + update of a
//!   fresh key (map size held at 10,000), the least an in-process claim +
//!   complete can cost;
//! - `fresh`: a new key every call (claim, run, encode, complete);
//! - `replay`: the same key every call (claim finds the record, decode).
//!
//! Run with `cargo bench -p idem-runtime`; `scripts/bench.sh` prints the ratios.

#![allow(missing_docs)] // criterion_group! emits undocumented items

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use criterion::{criterion_group, criterion_main, Criterion};
use idem_runtime::{idempotent, MemoryStore};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Order {
    id: u64,
    user_id: u64,
    product_id: u64,
    total_cents: u64,
}

#[derive(Debug)]
struct BenchError;

impl From<idem_runtime::Error> for BenchError {
    fn from(_: idem_runtime::Error) -> Self {
        BenchError
    }
}

struct Service {
    store: MemoryStore,
}

fn body(user_id: u64, product_id: u64) -> Order {
    Order {
        id: user_id ^ product_id,
        user_id,
        product_id,
        total_cents: 1999,
    }
}

impl Service {
    async fn plain(&self, user_id: u64, product_id: u64) -> Result<Order, BenchError> {
        Ok(body(user_id, product_id))
    }

    // A short ttl keeps the map from growing without bound over millions of
    // fresh keys: expired records are swept as the store is used.
    #[idempotent(key = (user_id, product_id), ttl = "1s", store = self.store)]
    async fn idempotent(&self, user_id: u64, product_id: u64) -> Result<Order, BenchError> {
        Ok(body(user_id, product_id))
    }
}

fn overhead(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let service = Service {
        store: MemoryStore::new(),
    };
    let mut group = c.benchmark_group("memory");

    group.bench_function("plain", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(service.plain(black_box(1), 2).await.unwrap()) })
    });

    // The floor: one claim-shaped insert of a fresh 64-hex-digit key and one
    // completion-shaped update, in a map of steady size, no hashing or encoding.
    let map: Mutex<HashMap<String, Vec<u8>>> = Mutex::default();
    let n = AtomicU64::new(0);
    group.bench_function("floor", |b| {
        b.iter(|| {
            let i = n.fetch_add(1, Ordering::Relaxed);
            let key = format!("bench:{i:064x}");
            let mut m = map.lock().unwrap();
            m.insert(key.clone(), Vec::new());
            if let Some(v) = m.get_mut(&key) {
                v.extend_from_slice(br#"{"ok":{}}"#);
            }
            m.remove(&format!("bench:{:064x}", i.wrapping_sub(10_000)));
        })
    });

    let fresh = AtomicU64::new(0);
    group.bench_function("fresh", |b| {
        b.to_async(&rt).iter(|| async {
            let user = fresh.fetch_add(1, Ordering::Relaxed);
            black_box(service.idempotent(user, 2).await.unwrap())
        })
    });

    rt.block_on(service.idempotent(u64::MAX, 2)).unwrap();
    group.bench_function("replay", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(service.idempotent(u64::MAX, 2).await.unwrap()) })
    });
    group.finish();
}

criterion_group!(benches, overhead);
criterion_main!(benches);
