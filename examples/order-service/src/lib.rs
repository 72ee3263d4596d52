//! An order service whose `create_order` is safe to retry: a client that times
//! out and sends the same order again gets the first order back, and 50
//! concurrent duplicates create one order.
//!
//! Orders, stock and idempotency records live in one database (SQLite by
//! default, or PostgreSQL), and `create_order` writes the order and its
//! idempotency record in the same transaction (`tx =`): after a crash there is
//! never an order without its record, or a record without its order.

use idem_runtime::{idempotent, PostgresStore, SqliteStore};
use serde::{Deserialize, Serialize};
use sqlx::{Postgres, Sqlite, Transaction};

pub mod demo;
pub mod payments;
pub mod server;

/// A request to order `quantity` of `product_id` for `user_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateOrderRequest {
    /// Who orders.
    pub user_id: u64,
    /// What is ordered.
    pub product_id: u64,
    /// How many.
    pub quantity: u32,
    /// Where it ships (not part of the key: it is the request's fingerprint).
    #[serde(default)]
    pub ship_to: String,
}

/// An order that was created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// The order number.
    pub id: i64,
    /// Who ordered.
    pub user_id: u64,
    /// What was ordered.
    pub product_id: u64,
    /// How many.
    pub quantity: u32,
    /// Where it ships.
    pub ship_to: String,
    /// The price in cents.
    pub total_cents: i64,
}

/// Why an order was not created.
#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    /// idem refused the call (in progress, key reused, store down, ...).
    #[error(transparent)]
    Idempotency(#[from] idem_runtime::Error),
    /// The database failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
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

/// Where orders and idempotency records live.
#[derive(Debug, Clone)]
pub enum Db {
    /// An SQLite file (the default) or in-memory database.
    Sqlite(SqliteStore),
    /// A PostgreSQL database.
    Postgres(PostgresStore),
}

impl Db {
    /// Opens `url`: `sqlite://orders.db`, `sqlite::memory:` or `postgres://...`,
    /// and creates the schema (records, orders, stock).
    pub async fn open(url: &str) -> Result<Db, OrderError> {
        let db = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Db::Postgres(PostgresStore::connect(url).await?)
        } else {
            Db::Sqlite(SqliteStore::connect(url).await?)
        };
        db.migrate().await?;
        Ok(db)
    }

    async fn migrate(&self) -> Result<(), OrderError> {
        match self {
            Db::Sqlite(s) => {
                sqlx::query(
                    "CREATE TABLE IF NOT EXISTS orders (
                        id INTEGER PRIMARY KEY AUTOINCREMENT, user_id INTEGER NOT NULL,
                        product_id INTEGER NOT NULL, quantity INTEGER NOT NULL,
                        ship_to TEXT NOT NULL, total_cents INTEGER NOT NULL)",
                )
                .execute(s.pool())
                .await?;
                sqlx::query(
                    "CREATE TABLE IF NOT EXISTS stock (product_id INTEGER PRIMARY KEY, quantity INTEGER NOT NULL)",
                )
                .execute(s.pool())
                .await?;
                sqlx::query(
                    "CREATE TABLE IF NOT EXISTS charges (
                        id INTEGER PRIMARY KEY AUTOINCREMENT, provider_key TEXT NOT NULL UNIQUE,
                        order_id INTEGER NOT NULL, amount_cents INTEGER NOT NULL)",
                )
                .execute(s.pool())
                .await?;
            }
            Db::Postgres(s) => {
                sqlx::query(
                    "CREATE TABLE IF NOT EXISTS orders (
                        id BIGSERIAL PRIMARY KEY, user_id BIGINT NOT NULL,
                        product_id BIGINT NOT NULL, quantity INT NOT NULL,
                        ship_to TEXT NOT NULL, total_cents BIGINT NOT NULL)",
                )
                .execute(s.pool())
                .await?;
                sqlx::query(
                    "CREATE TABLE IF NOT EXISTS stock (product_id BIGINT PRIMARY KEY, quantity INT NOT NULL)",
                )
                .execute(s.pool())
                .await?;
                sqlx::query(
                    "CREATE TABLE IF NOT EXISTS charges (
                        id BIGSERIAL PRIMARY KEY, provider_key TEXT NOT NULL UNIQUE,
                        order_id BIGINT NOT NULL, amount_cents BIGINT NOT NULL)",
                )
                .execute(s.pool())
                .await?;
            }
        }
        Ok(())
    }
}

/// The order service.
#[derive(Debug, Clone)]
pub struct OrderService {
    db: Db,
}

const PRICE_CENTS: i64 = 1_999;

impl OrderService {
    /// A service on `db`.
    pub fn new(db: Db) -> Self {
        OrderService { db }
    }

    /// Where orders and idempotency records live.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The order numbered `id`, if it exists.
    pub async fn order(&self, id: i64) -> Result<Option<Order>, sqlx::Error> {
        type Row = (i64, i64, i64, i64, String, i64);
        let row: Option<Row> = match &self.db {
            Db::Sqlite(s) => {
                sqlx::query_as("SELECT id, user_id, product_id, quantity, ship_to, total_cents FROM orders WHERE id = ?1")
                    .bind(id)
                    .fetch_optional(s.pool())
                    .await?
            }
            Db::Postgres(s) => {
                sqlx::query_as("SELECT id, user_id, product_id, quantity::BIGINT, ship_to, total_cents FROM orders WHERE id = $1")
                    .bind(id)
                    .fetch_optional(s.pool())
                    .await?
            }
        };
        Ok(row.map(
            |(id, user_id, product_id, quantity, ship_to, total_cents)| Order {
                id,
                user_id: user_id as u64,
                product_id: product_id as u64,
                quantity: quantity as u32,
                ship_to,
                total_cents,
            },
        ))
    }

    /// Which database this service uses, for display.
    pub fn backend(&self) -> &'static str {
        match self.db {
            Db::Sqlite(_) => "SQLite",
            Db::Postgres(_) => "PostgreSQL",
        }
    }

    /// Sets how many of `product_id` are in stock.
    pub async fn restock(&self, product_id: u64, quantity: u32) -> Result<(), OrderError> {
        self.put_stock(product_id, quantity, true).await
    }

    /// Puts `quantity` of `product_id` in stock unless the product has a stock row already.
    pub async fn stock_if_absent(&self, product_id: u64, quantity: u32) -> Result<(), OrderError> {
        self.put_stock(product_id, quantity, false).await
    }

    async fn put_stock(
        &self,
        product_id: u64,
        quantity: u32,
        overwrite: bool,
    ) -> Result<(), OrderError> {
        match &self.db {
            Db::Sqlite(s) => {
                let sql = if overwrite {
                    "INSERT INTO stock (product_id, quantity) VALUES (?1, ?2) ON CONFLICT (product_id) DO UPDATE SET quantity = excluded.quantity"
                } else {
                    "INSERT INTO stock (product_id, quantity) VALUES (?1, ?2) ON CONFLICT (product_id) DO NOTHING"
                };
                sqlx::query(sql)
                    .bind(product_id as i64)
                    .bind(quantity as i64)
                    .execute(s.pool())
                    .await?;
            }
            Db::Postgres(s) => {
                let sql = if overwrite {
                    "INSERT INTO stock (product_id, quantity) VALUES ($1, $2) ON CONFLICT (product_id) DO UPDATE SET quantity = EXCLUDED.quantity"
                } else {
                    "INSERT INTO stock (product_id, quantity) VALUES ($1, $2) ON CONFLICT (product_id) DO NOTHING"
                };
                sqlx::query(sql)
                    .bind(product_id as i64)
                    .bind(quantity as i32)
                    .execute(s.pool())
                    .await?;
            }
        }
        Ok(())
    }

    /// Creates an order once per user, product and quantity per UTC day, in one
    /// transaction with its idempotency record; commits on success.
    ///
    /// A repeat of the same order replays the first result; one that arrives
    /// while the first is running waits for it (up to 10 s); the same key with
    /// a different shipping address is refused as key reuse.
    pub async fn create_order(&self, req: CreateOrderRequest) -> Result<Order, OrderError> {
        match &self.db {
            Db::Sqlite(store) => {
                let mut tx = store.pool().begin().await?;
                let order = self.create_order_sqlite(store, &mut tx, req).await?;
                tx.commit().await?;
                Ok(order)
            }
            Db::Postgres(store) => {
                let mut tx = store.pool().begin().await?;
                let order = self.create_order_postgres(store, &mut tx, req).await?;
                tx.commit().await?;
                Ok(order)
            }
        }
    }

    #[idempotent(
        key = (req.user_id, req.product_id, req.quantity),
        fingerprint = req.ship_to,
        window = "1d",
        ttl = "24h",
        in_progress = wait("10s"),
        name = "order-service::create_order",
        store = store,
        tx = tx,
    )]
    async fn create_order_sqlite(
        &self,
        store: &SqliteStore,
        tx: &mut Transaction<'_, Sqlite>,
        req: CreateOrderRequest,
    ) -> Result<Order, OrderError> {
        if req.quantity == 0 {
            return Err(OrderError::InvalidQuantity);
        }
        let taken = sqlx::query(
            "UPDATE stock SET quantity = quantity - ?2 WHERE product_id = ?1 AND quantity >= ?2",
        )
        .bind(req.product_id as i64)
        .bind(req.quantity as i64)
        .execute(&mut **tx)
        .await?;
        if taken.rows_affected() == 0 {
            return Err(OrderError::OutOfStock {
                product_id: req.product_id,
            });
        }
        let total_cents = PRICE_CENTS * i64::from(req.quantity);
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO orders (user_id, product_id, quantity, ship_to, total_cents)
             VALUES (?1, ?2, ?3, ?4, ?5) RETURNING id",
        )
        .bind(req.user_id as i64)
        .bind(req.product_id as i64)
        .bind(req.quantity as i64)
        .bind(req.ship_to.clone())
        .bind(total_cents)
        .fetch_one(&mut **tx)
        .await?;
        Ok(order(id, req, total_cents))
    }

    #[idempotent(
        key = (req.user_id, req.product_id, req.quantity),
        fingerprint = req.ship_to,
        window = "1d",
        ttl = "24h",
        in_progress = wait("10s"),
        name = "order-service::create_order",
        store = store,
        tx = tx,
    )]
    async fn create_order_postgres(
        &self,
        store: &PostgresStore,
        tx: &mut Transaction<'_, Postgres>,
        req: CreateOrderRequest,
    ) -> Result<Order, OrderError> {
        if req.quantity == 0 {
            return Err(OrderError::InvalidQuantity);
        }
        let taken = sqlx::query(
            "UPDATE stock SET quantity = quantity - $2 WHERE product_id = $1 AND quantity >= $2",
        )
        .bind(req.product_id as i64)
        .bind(req.quantity as i32)
        .execute(&mut **tx)
        .await?;
        if taken.rows_affected() == 0 {
            return Err(OrderError::OutOfStock {
                product_id: req.product_id,
            });
        }
        let total_cents = PRICE_CENTS * i64::from(req.quantity);
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO orders (user_id, product_id, quantity, ship_to, total_cents)
             VALUES ($1, $2, $3, $4, $5) RETURNING id",
        )
        .bind(req.user_id as i64)
        .bind(req.product_id as i64)
        .bind(req.quantity as i32)
        .bind(req.ship_to.clone())
        .bind(total_cents)
        .fetch_one(&mut **tx)
        .await?;
        Ok(order(id, req, total_cents))
    }

    /// How many orders `user_ids` have.
    pub async fn orders_of(&self, user_ids: &[u64]) -> Result<i64, OrderError> {
        let mut total = 0;
        for user in user_ids {
            total += match &self.db {
                Db::Sqlite(s) => {
                    sqlx::query_scalar::<_, i64>("SELECT count(*) FROM orders WHERE user_id = ?1")
                        .bind(*user as i64)
                        .fetch_one(s.pool())
                        .await?
                }
                Db::Postgres(s) => {
                    sqlx::query_scalar::<_, i64>("SELECT count(*) FROM orders WHERE user_id = $1")
                        .bind(*user as i64)
                        .fetch_one(s.pool())
                        .await?
                }
            };
        }
        Ok(total)
    }
}

fn order(id: i64, req: CreateOrderRequest, total_cents: i64) -> Order {
    Order {
        id,
        user_id: req.user_id,
        product_id: req.product_id,
        quantity: req.quantity,
        ship_to: req.ship_to,
        total_cents,
    }
}
