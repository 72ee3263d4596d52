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

pub mod checkout;
pub mod db;
pub mod demo;
pub mod metrics;
pub mod payments;
pub mod request;
pub mod server;

pub use db::Db;

/// The longest user or product id accepted, in characters.
pub const MAX_ID_CHARS: usize = 255;
/// The most of one product one order may take.
pub const MAX_QUANTITY: u32 = 1_000_000;
/// The longest shipping address accepted, in characters.
pub const MAX_SHIP_TO_CHARS: usize = 1_000;
/// The products `serve` puts in stock (1,000 each) on first start.
pub const CATALOGUE: [&str; 10] = [
    "SKU-0001", "SKU-0002", "SKU-0003", "SKU-0004", "SKU-0005", "SKU-0006", "SKU-0007", "SKU-0008",
    "SKU-0009", "SKU-0010",
];

/// A request to order `quantity` of `product_id` for `user_id`: the original
/// service's `{"user_id": "...", "product_id": "...", "quantity": n}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateOrderRequest {
    /// Who orders: 1 to 255 characters.
    pub user_id: String,
    /// What is ordered, a SKU such as `SKU-0001`: 1 to 255 characters.
    pub product_id: String,
    /// How many: 1 to [`MAX_QUANTITY`].
    pub quantity: u32,
    /// Where it ships (not part of the key: it is the request's fingerprint).
    #[serde(default)]
    pub ship_to: String,
}

impl CreateOrderRequest {
    /// Checks what JSON cannot: ids of 1 to 255 characters and no control
    /// characters, a positive quantity, the address's length (and no U+0000).
    /// The message names the field and the rule, never the value.
    pub fn validate(&self) -> Result<(), OrderError> {
        let id = |name: &str, value: &str| {
            let chars = value.chars().count();
            if !(1..=MAX_ID_CHARS).contains(&chars) {
                Err(OrderError::Invalid(format!(
                    "{name} must be 1 to {MAX_ID_CHARS} characters (got {chars})"
                )))
            } else if value.chars().any(char::is_control) {
                Err(OrderError::Invalid(format!(
                    "{name} must not contain control characters"
                )))
            } else {
                Ok(())
            }
        };
        id("user_id", &self.user_id)?;
        id("product_id", &self.product_id)?;
        if !(1..=MAX_QUANTITY).contains(&self.quantity) {
            return Err(OrderError::Invalid(format!(
                "quantity must be a whole number from 1 to {MAX_QUANTITY}"
            )));
        }
        if self.ship_to.chars().count() > MAX_SHIP_TO_CHARS {
            return Err(OrderError::Invalid(format!(
                "ship_to must be at most {MAX_SHIP_TO_CHARS} characters"
            )));
        }
        // PostgreSQL's TEXT cannot hold U+0000: refused here as input, not met
        // later as a database error.
        if self.ship_to.contains('\0') {
            return Err(OrderError::Invalid(
                "ship_to must not contain U+0000".to_owned(),
            ));
        }
        Ok(())
    }
}

/// An order that was created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// The order number: what `POST /payments` takes as `order_id`.
    pub id: i64,
    /// Who ordered.
    pub user_id: String,
    /// What was ordered.
    pub product_id: String,
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
    /// No such product. (The message does not quote the id: it is the
    /// client's input.)
    #[error("the product does not exist")]
    UnknownProduct {
        /// The product asked for.
        product_id: String,
    },
    /// The product has too little stock left.
    #[error("the product has too little stock left")]
    OutOfStock {
        /// The product asked for.
        product_id: String,
    },
    /// The request breaks a rule JSON cannot state (see
    /// [`CreateOrderRequest::validate`]).
    #[error("{0}")]
    Invalid(String),
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

    /// Which database this service uses, for display.
    pub fn backend(&self) -> &'static str {
        self.db.backend()
    }

    /// The order numbered `id`, if it exists.
    pub async fn order(&self, id: i64) -> Result<Option<Order>, sqlx::Error> {
        type Row = (i64, String, String, i64, String, i64);
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
                user_id,
                product_id,
                quantity: quantity as u32,
                ship_to,
                total_cents,
            },
        ))
    }

    /// Puts 1,000 of every [`CATALOGUE`] product in stock, unless the product
    /// has a stock row already (so a restart keeps what was sold).
    pub async fn seed_catalogue(&self) -> Result<(), OrderError> {
        for sku in CATALOGUE {
            self.stock_if_absent(sku, 1_000).await?;
        }
        Ok(())
    }

    /// Sets how many of `product_id` are in stock (creating the product).
    pub async fn restock(&self, product_id: &str, quantity: u32) -> Result<(), OrderError> {
        self.put_stock(product_id, quantity, true).await
    }

    /// Puts `quantity` of `product_id` in stock unless the product has a stock row already.
    pub async fn stock_if_absent(&self, product_id: &str, quantity: u32) -> Result<(), OrderError> {
        self.put_stock(product_id, quantity, false).await
    }

    async fn put_stock(
        &self,
        product_id: &str,
        quantity: u32,
        overwrite: bool,
    ) -> Result<(), OrderError> {
        let quantity = i64::from(quantity.min(i32::MAX as u32));
        let on_conflict = if overwrite {
            "DO UPDATE SET quantity = excluded.quantity"
        } else {
            "DO NOTHING"
        };
        match &self.db {
            Db::Sqlite(s) => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "INSERT INTO stock (product_id, quantity) VALUES (?1, ?2) ON CONFLICT (product_id) {on_conflict}"
                )))
                .bind(product_id)
                .bind(quantity)
                .execute(s.pool())
                .await?;
            }
            Db::Postgres(s) => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "INSERT INTO stock (product_id, quantity) VALUES ($1, $2::INT) ON CONFLICT (product_id) {on_conflict}"
                )))
                .bind(product_id)
                .bind(quantity)
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
    /// a different shipping address is refused as key reuse. An invalid
    /// request is refused before anything is claimed.
    pub async fn create_order(&self, req: CreateOrderRequest) -> Result<Order, OrderError> {
        req.validate()?;
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
        let taken = sqlx::query(
            "UPDATE stock SET quantity = quantity - ?2 WHERE product_id = ?1 AND quantity >= ?2",
        )
        .bind(&req.product_id)
        .bind(i64::from(req.quantity))
        .execute(&mut **tx)
        .await?;
        if taken.rows_affected() == 0 {
            let known: Option<i64> =
                sqlx::query_scalar("SELECT 1 FROM stock WHERE product_id = ?1")
                    .bind(&req.product_id)
                    .fetch_optional(&mut **tx)
                    .await?;
            return Err(not_taken(known.is_some(), req.product_id));
        }
        let total_cents = PRICE_CENTS * i64::from(req.quantity);
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO orders (user_id, product_id, quantity, ship_to, total_cents)
             VALUES (?1, ?2, ?3, ?4, ?5) RETURNING id",
        )
        .bind(&req.user_id)
        .bind(&req.product_id)
        .bind(i64::from(req.quantity))
        .bind(&req.ship_to)
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
        let taken = sqlx::query(
            "UPDATE stock SET quantity = quantity - $2::INT WHERE product_id = $1 AND quantity >= $2::INT",
        )
        .bind(&req.product_id)
        .bind(i64::from(req.quantity))
        .execute(&mut **tx)
        .await?;
        if taken.rows_affected() == 0 {
            let known: Option<i32> =
                sqlx::query_scalar("SELECT 1 FROM stock WHERE product_id = $1")
                    .bind(&req.product_id)
                    .fetch_optional(&mut **tx)
                    .await?;
            return Err(not_taken(known.is_some(), req.product_id));
        }
        let total_cents = PRICE_CENTS * i64::from(req.quantity);
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO orders (user_id, product_id, quantity, ship_to, total_cents)
             VALUES ($1, $2, $3::INT, $4, $5) RETURNING id",
        )
        .bind(&req.user_id)
        .bind(&req.product_id)
        .bind(i64::from(req.quantity))
        .bind(&req.ship_to)
        .bind(total_cents)
        .fetch_one(&mut **tx)
        .await?;
        Ok(order(id, req, total_cents))
    }

    /// How many orders `user_ids` have.
    pub async fn orders_of(&self, user_ids: &[&str]) -> Result<i64, OrderError> {
        let mut total = 0;
        for user in user_ids {
            total += match &self.db {
                Db::Sqlite(s) => {
                    sqlx::query_scalar::<_, i64>("SELECT count(*) FROM orders WHERE user_id = ?1")
                        .bind(*user)
                        .fetch_one(s.pool())
                        .await?
                }
                Db::Postgres(s) => {
                    sqlx::query_scalar::<_, i64>("SELECT count(*) FROM orders WHERE user_id = $1")
                        .bind(*user)
                        .fetch_one(s.pool())
                        .await?
                }
            };
        }
        Ok(total)
    }
}

/// Why no stock was taken: the product is unknown, or has too little left.
fn not_taken(known: bool, product_id: String) -> OrderError {
    if known {
        OrderError::OutOfStock { product_id }
    } else {
        OrderError::UnknownProduct { product_id }
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
