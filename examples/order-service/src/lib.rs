//! An order service whose `create_order` is safe to retry: a client that times
//! out and sends the same order again gets the first order back, and 50
//! concurrent duplicates create one order.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem_runtime::{idempotent, Store};
use serde::{Deserialize, Serialize};

pub mod demo;

/// A request to order `quantity` of `product_id` for `user_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateOrderRequest {
    /// Who orders.
    pub user_id: u64,
    /// What is ordered.
    pub product_id: u64,
    /// How many.
    pub quantity: u32,
    /// Where it ships (not part of the key: it is part of the fingerprint).
    pub ship_to: String,
}

/// An order that was created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// The order number.
    pub id: u64,
    /// Who ordered.
    pub user_id: u64,
    /// What was ordered.
    pub product_id: u64,
    /// How many.
    pub quantity: u32,
    /// Where it ships.
    pub ship_to: String,
    /// The price in cents.
    pub total_cents: u64,
}

/// Why an order was not created.
#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    /// idem refused the call (in progress, key reused, store down, ...).
    #[error(transparent)]
    Idempotency(#[from] idem_runtime::Error),
    /// The product has no stock left.
    #[error("product {product_id} is out of stock")]
    OutOfStock {
        /// The product asked for.
        product_id: u64,
    },
    /// The quantity was zero.
    #[error("quantity must be at least 1")]
    InvalidQuantity,
}

/// The order service: orders in memory, idempotency records in a [`Store`].
pub struct OrderService {
    store: Arc<dyn Store>,
    orders: Mutex<Vec<Order>>,
    stock: Mutex<HashMap<u64, u32>>,
    next_id: AtomicU64,
    /// Simulated work per order (a database write, a payment hold).
    work: Duration,
}

impl OrderService {
    /// A service keeping its idempotency records in `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        OrderService {
            store,
            orders: Mutex::default(),
            stock: Mutex::default(),
            next_id: AtomicU64::new(1),
            work: Duration::from_millis(20),
        }
    }

    /// Sets how many of `product_id` are in stock.
    pub fn restock(&self, product_id: u64, quantity: u32) {
        self.stock.lock().unwrap().insert(product_id, quantity);
    }

    /// Creates an order once per user, product and quantity per UTC day.
    ///
    /// A repeat of the same order replays the first result; a repeat that
    /// arrives while the first is running waits for it (up to 10 s). The same
    /// key with a different shipping address is refused as key reuse.
    #[idempotent(
        key = (req.user_id, req.product_id, req.quantity),
        fingerprint = req.ship_to,
        window = "1d",
        ttl = "24h",
        in_progress = wait("10s"),
        name = "order-service::create_order",
        store = self.store,
    )]
    pub async fn create_order(&self, req: CreateOrderRequest) -> Result<Order, OrderError> {
        if req.quantity == 0 {
            return Err(OrderError::InvalidQuantity);
        }
        tokio::time::sleep(self.work).await;
        {
            let mut stock = self.stock.lock().unwrap();
            let left = stock.entry(req.product_id).or_insert(0);
            if *left < req.quantity {
                return Err(OrderError::OutOfStock {
                    product_id: req.product_id,
                });
            }
            *left -= req.quantity;
        }
        let order = Order {
            id: self.next_id.fetch_add(1, Ordering::SeqCst),
            user_id: req.user_id,
            product_id: req.product_id,
            quantity: req.quantity,
            ship_to: req.ship_to,
            total_cents: 1_999 * u64::from(req.quantity),
        };
        self.orders.lock().unwrap().push(order.clone());
        Ok(order)
    }

    /// How many orders were actually created.
    pub fn orders_created(&self) -> usize {
        self.orders.lock().unwrap().len()
    }
}
