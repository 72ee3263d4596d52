//! Payments through a simulated card provider that behaves like Stripe's test
//! mode: it deduplicates charges by the idempotency key the caller sends it, and
//! answers Stripe's test cards the way Stripe does.

use serde::{Deserialize, Serialize};

use crate::{Db, OrderService};

/// Stripe's test card that always succeeds.
pub const CARD_OK: &str = "4242424242424242";
/// Stripe's test card that is always declined (`card_declined`).
pub const CARD_DECLINED: &str = "4000000000000002";
/// Stripe's test card that always fails with `processing_error`.
pub const CARD_PROCESSING_ERROR: &str = "4000000000000119";

/// A request to pay for an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentRequest {
    /// The order paid for.
    pub order_id: i64,
    /// The amount, in cents.
    pub amount_cents: i64,
    /// The card number.
    pub card: String,
}

/// A successful charge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Charge {
    /// The provider's charge number.
    pub id: i64,
    /// The order paid for.
    pub order_id: i64,
    /// The amount charged, in cents.
    pub amount_cents: i64,
    /// Always `succeeded`.
    pub status: String,
}

/// Why a payment did not go through.
#[derive(Debug, thiserror::Error)]
pub enum PaymentError {
    /// The card was declined: a final answer, replayed to retries.
    #[error("your card was declined")]
    Declined,
    /// The provider failed: a retry may succeed.
    #[error("the card provider had a processing error; try again")]
    ProcessingError,
    /// No such order.
    #[error("order {0} does not exist")]
    OrderNotFound(i64),
    /// The amount was zero or negative.
    #[error("amount_cents must be positive")]
    InvalidAmount,
    /// The database failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

impl OrderService {
    /// Charges `card` for an order through the simulated provider, which creates
    /// at most one charge per `provider_key` (as Stripe does with its
    /// `Idempotency-Key`), so a retry after a crash never charges twice.
    pub async fn pay(
        &self,
        req: &PaymentRequest,
        provider_key: &str,
    ) -> Result<Charge, PaymentError> {
        if req.amount_cents <= 0 {
            return Err(PaymentError::InvalidAmount);
        }
        if self.order(req.order_id).await?.is_none() {
            return Err(PaymentError::OrderNotFound(req.order_id));
        }
        match req.card.as_str() {
            CARD_OK => {}
            CARD_PROCESSING_ERROR => return Err(PaymentError::ProcessingError),
            _ => return Err(PaymentError::Declined),
        }
        let (id, order_id, amount_cents): (i64, i64, i64) = match self.db() {
            Db::Sqlite(s) => {
                sqlx::query(
                    "INSERT INTO charges (provider_key, order_id, amount_cents) VALUES (?1, ?2, ?3)
                     ON CONFLICT (provider_key) DO NOTHING",
                )
                .bind(provider_key)
                .bind(req.order_id)
                .bind(req.amount_cents)
                .execute(s.pool())
                .await?;
                sqlx::query_as(
                    "SELECT id, order_id, amount_cents FROM charges WHERE provider_key = ?1",
                )
                .bind(provider_key)
                .fetch_one(s.pool())
                .await?
            }
            Db::Postgres(s) => {
                sqlx::query(
                    "INSERT INTO charges (provider_key, order_id, amount_cents) VALUES ($1, $2, $3)
                     ON CONFLICT (provider_key) DO NOTHING",
                )
                .bind(provider_key)
                .bind(req.order_id)
                .bind(req.amount_cents)
                .execute(s.pool())
                .await?;
                sqlx::query_as(
                    "SELECT id, order_id, amount_cents FROM charges WHERE provider_key = $1",
                )
                .bind(provider_key)
                .fetch_one(s.pool())
                .await?
            }
        };
        Ok(Charge {
            id,
            order_id,
            amount_cents,
            status: "succeeded".into(),
        })
    }

    /// How many charges exist for orders of `user_ids`.
    pub async fn charges_of(&self, user_ids: &[&str]) -> Result<i64, sqlx::Error> {
        let mut total = 0;
        for user in user_ids {
            total += match self.db() {
                Db::Sqlite(s) => {
                    sqlx::query_scalar::<_, i64>(
                        "SELECT count(*) FROM charges c JOIN orders o ON o.id = c.order_id WHERE o.user_id = ?1",
                    )
                        .bind(*user)
                        .fetch_one(s.pool())
                        .await?
                }
                Db::Postgres(s) => {
                    sqlx::query_scalar::<_, i64>(
                        "SELECT count(*) FROM charges c JOIN orders o ON o.id = c.order_id WHERE o.user_id = $1",
                    )
                        .bind(*user)
                        .fetch_one(s.pool())
                        .await?
                }
            };
        }
        Ok(total)
    }
}
