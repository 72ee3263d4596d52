//! What the `metrics` feature costs a call when no recorder is installed:
//! `N` fresh calls and `N` replays on a `MemoryStore`, for counting
//! instructions with callgrind in a build with and without the feature
//! (BENCHMARKS.md, "Metrics"):
//!
//! ```sh
//! cargo build --release -p idem-runtime --example metrics_cost [--features metrics]
//! valgrind --tool=callgrind target/release/examples/metrics_cost 20000
//! ```

use idem_runtime::{idempotent, Error, MemoryStore};

struct Service {
    store: MemoryStore,
}

impl Service {
    #[idempotent(key = (user_id, product_id), ttl = "1h", store = self.store)]
    async fn order(&self, user_id: u64, product_id: u64) -> Result<u64, Error> {
        Ok(user_id ^ product_id)
    }
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20_000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let service = Service {
        store: MemoryStore::new(),
    };
    let total = rt.block_on(async {
        let mut total = 0u64;
        for _round in 0..2 {
            // Round 0: every key fresh; round 1: every key a replay.
            for i in 0..n {
                total = total.wrapping_add(service.order(i, 7).await.expect("runs"));
            }
        }
        total
    });
    println!("{n} fresh calls and {n} replays (checksum {total})");
}
