//! The servers `scripts/bench-http.sh` drives with `wrk`, one per mode:
//!
//! - `bare` / `bare+layer`: a handler that parses an order and answers 201 with
//!   it, no database: the cheapest real handler, so the layer's own cost shows;
//! - `orders` / `orders+layer`: the order service's `POST /orders` on an SQLite
//!   file (`create_order` writing the order and its record in one transaction).
//!
//! `+layer` adds `IdempotencyLayer` with a `MemoryStore`, key required.
//!
//! Usage: `http-bench-server MODE ADDR [SQLITE_URL]`; runs until killed.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use idem_runtime::http::IdempotencyLayer;
use idem_runtime::MemoryStore;
use order_service::{server, CreateOrderRequest, Db, Order, OrderService};

async fn bare(
    State(next): State<Arc<AtomicI64>>,
    Json(req): Json<CreateOrderRequest>,
) -> (StatusCode, Json<Order>) {
    let id = next.fetch_add(1, Ordering::Relaxed);
    let order = Order {
        id,
        user_id: req.user_id,
        product_id: req.product_id,
        quantity: req.quantity,
        ship_to: req.ship_to,
        total_cents: 1_999 * i64::from(req.quantity),
    };
    (StatusCode::CREATED, Json(order))
}

fn layer() -> IdempotencyLayer {
    // One benchmark client: one key space, on purpose.
    IdempotencyLayer::new(MemoryStore::new())
        .require_key(true)
        .global_scope()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mode, addr) =
        match args.as_slice() {
            [mode, addr, ..] => (mode.as_str(), addr.as_str()),
            _ => return Err(
                "usage: http-bench-server bare|bare+layer|orders|orders+layer ADDR [SQLITE_URL]"
                    .into(),
            ),
        };
    let db = args
        .get(2)
        .map_or("sqlite://bench-orders.db", String::as_str);
    let app = match mode {
        "bare" | "bare+layer" => {
            let routes = Router::new().route("/orders", post(bare));
            let routes = if mode == "bare+layer" {
                routes.layer(layer())
            } else {
                routes
            };
            routes.with_state(Arc::new(AtomicI64::new(1)))
        }
        "orders" | "orders+layer" => {
            let service = OrderService::new(Db::open(db).await?);
            // Every user id in the load is new, so each order is fresh; product 1
            // never runs out.
            service.restock("SKU-0001", u32::MAX / 2).await?;
            if mode == "orders+layer" {
                server::router_without_layer(service).layer(layer())
            } else {
                server::router_without_layer(service)
            }
        }
        other => return Err(format!("unknown mode {other}").into()),
    };
    let running = server::start_router(addr, app).await?;
    println!("{mode} listening on {}", running.url());
    std::future::pending::<()>().await;
    Ok(())
}
