//! `POST /checkout`: four side effects in one idempotent call, each a step
//! (`idem_runtime::step`): reserve the stock (place the order), charge the
//! card, book the shipment, send the confirmation email. A retry after a
//! failure replays the steps that finished and runs the rest: one charge, one
//! shipment, one email, however often the client retries.

use idem_runtime::{current, step};
use serde::{Deserialize, Serialize};

use crate::payments::{Charge, PaymentError, PaymentRequest};
use crate::{CreateOrderRequest, Db, Order, OrderError, OrderService};

/// A checkout: the order, and the card that pays for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckoutRequest {
    /// The order (user, product, quantity, shipping address).
    #[serde(flatten)]
    pub order: CreateOrderRequest,
    /// The card number (Stripe's test cards, see [`crate::payments`]).
    pub card: String,
}

/// A booked shipment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shipment {
    /// The shipment's number.
    pub id: i64,
    /// The order shipped.
    pub order_id: i64,
    /// Where to.
    pub ship_to: String,
}

/// A confirmation email, as the simulated mailer recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Email {
    /// The email's number in the mailer's log.
    pub id: i64,
    /// Who it went to (the user id).
    pub to: String,
    /// Its subject.
    pub subject: String,
}

/// What a finished checkout answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The order placed (its stock reserved).
    pub order: Order,
    /// The charge.
    pub charge: Charge,
    /// The shipment booked.
    pub shipment: Shipment,
    /// The confirmation sent.
    pub email: Email,
}

/// Why a checkout did not finish.
#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    /// The order could not be placed.
    #[error(transparent)]
    Order(#[from] OrderError),
    /// The card was not charged.
    #[error(transparent)]
    Payment(#[from] PaymentError),
    /// idem refused a step (a changed body, a store that failed, ...).
    #[error(transparent)]
    Idempotency(#[from] idem_runtime::Error),
    /// The database failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The failure the demo injects (`X-Demo-Crash-After: charge`): the
    /// checkout stops right after that step, as a crash would.
    #[error("the checkout stopped after step {0} (a failure the demo injected)")]
    Injected(String),
}

impl OrderService {
    /// Runs a checkout's four steps under the running idempotent call (the
    /// HTTP layer's, for `POST /checkout`): each step runs once per call,
    /// and a retry resumes after the last one that finished. `stop_after`
    /// names a step after which the checkout fails, as if it crashed there
    /// (the demo's injected failure).
    pub async fn checkout(
        &self,
        req: CheckoutRequest,
        stop_after: Option<&str>,
    ) -> Result<Receipt, CheckoutError> {
        let stop = |name: &str| match stop_after {
            Some(at) if at == name => Err(CheckoutError::Injected(name.to_owned())),
            _ => Ok(()),
        };
        let attempt = current().ok_or_else(|| {
            CheckoutError::Idempotency(idem_runtime::Error::StepMisuse(
                "a checkout runs only inside an idempotent call".into(),
            ))
        })?;
        if attempt.took_over() {
            tracing::info!("checkout resumed: finished steps replay, the rest run");
        }
        let order = step("reserve-stock", async {
            Ok::<_, CheckoutError>(self.create_order(req.order.clone()).await?)
        })
        .await?;
        stop("reserve-stock")?;
        // The card provider deduplicates by this key: the same for every
        // attempt of this call, so even a charge whose reply was lost (the
        // one thing a step cannot know) is not made twice.
        let provider_key = attempt.derive_key("card-provider");
        let charge = step("charge", async {
            let payment = PaymentRequest {
                order_id: order.id,
                amount_cents: order.total_cents,
                card: req.card.clone(),
            };
            Ok::<_, CheckoutError>(self.pay(&payment, &provider_key).await?)
        })
        .await?;
        stop("charge")?;
        let shipment = step("ship", self.book_shipment(&order)).await?;
        stop("ship")?;
        let email = step("email", self.send_confirmation(&order, &charge, &shipment)).await?;
        Ok(Receipt {
            order,
            charge,
            shipment,
            email,
        })
    }

    /// Books a shipment for `order` (a row in `shipments`).
    async fn book_shipment(&self, order: &Order) -> Result<Shipment, CheckoutError> {
        let id: i64 = match self.db() {
            Db::Sqlite(s) => {
                sqlx::query_scalar(
                    "INSERT INTO shipments (order_id, ship_to) VALUES (?1, ?2) RETURNING id",
                )
                .bind(order.id)
                .bind(&order.ship_to)
                .fetch_one(s.pool())
                .await?
            }
            Db::Postgres(s) => {
                sqlx::query_scalar(
                    "INSERT INTO shipments (order_id, ship_to) VALUES ($1, $2) RETURNING id",
                )
                .bind(order.id)
                .bind(&order.ship_to)
                .fetch_one(s.pool())
                .await?
            }
        };
        Ok(Shipment {
            id,
            order_id: order.id,
            ship_to: order.ship_to.clone(),
        })
    }

    /// Sends the confirmation: the simulated mailer records it in `emails`.
    async fn send_confirmation(
        &self,
        order: &Order,
        charge: &Charge,
        shipment: &Shipment,
    ) -> Result<Email, CheckoutError> {
        let subject = format!(
            "Order {} confirmed: charge {}, shipment {}",
            order.id, charge.id, shipment.id
        );
        let id: i64 = match self.db() {
            Db::Sqlite(s) => {
                sqlx::query_scalar(
                    "INSERT INTO emails (order_id, recipient, subject) VALUES (?1, ?2, ?3) RETURNING id",
                )
                .bind(order.id)
                .bind(&order.user_id)
                .bind(&subject)
                .fetch_one(s.pool())
                .await?
            }
            Db::Postgres(s) => {
                sqlx::query_scalar(
                    "INSERT INTO emails (order_id, recipient, subject) VALUES ($1, $2, $3) RETURNING id",
                )
                .bind(order.id)
                .bind(&order.user_id)
                .bind(&subject)
                .fetch_one(s.pool())
                .await?
            }
        };
        Ok(Email {
            id,
            to: order.user_id.clone(),
            subject,
        })
    }

    /// How many charges, shipments and emails exist for order `order_id`.
    pub async fn effects_of(&self, order_id: i64) -> Result<(i64, i64, i64), sqlx::Error> {
        let count = |table: &str| match self.db() {
            Db::Sqlite(_) => format!("SELECT count(*) FROM {table} WHERE order_id = ?1"),
            Db::Postgres(_) => format!("SELECT count(*) FROM {table} WHERE order_id = $1"),
        };
        let mut counts = [0i64; 3];
        for (n, table) in counts.iter_mut().zip(["charges", "shipments", "emails"]) {
            *n = match self.db() {
                Db::Sqlite(s) => {
                    sqlx::query_scalar(sqlx::AssertSqlSafe(count(table)))
                        .bind(order_id)
                        .fetch_one(s.pool())
                        .await?
                }
                Db::Postgres(s) => {
                    sqlx::query_scalar(sqlx::AssertSqlSafe(count(table)))
                        .bind(order_id)
                        .fetch_one(s.pool())
                        .await?
                }
            };
        }
        Ok((counts[0], counts[1], counts[2]))
    }
}
