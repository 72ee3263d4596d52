//! A payments service over gRPC (tonic) made safe to retry by idem's
//! [`IdempotencyLayer`]: a call carrying an `idempotency-key` metadata entry
//! charges once, and its retries get the first reply back.
//!
//! The handler ([`Ledger::charge`]) knows nothing of idempotency; the layer
//! in front of the tonic server claims the key, runs it once, stores its
//! reply (message, metadata and trailers) and replays it. No `protoc`: the
//! messages and the service are written out in [`proto`].
//!
//! `cargo run -p grpc-example` runs a self-driving demo (src/main.rs).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem_runtime::http::IdempotencyLayer;
use idem_runtime::Store;
use tokio::net::TcpListener;
use tonic::metadata::MetadataValue;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

pub mod proto;

pub use proto::{ChargeReply, ChargeRequest, PaymentsClient, PaymentsServer};

/// The payments handler's logic and its record of charges: it charges every
/// time it is called (the layer is what makes a retry not charge again).
#[derive(Debug, Default)]
pub struct Ledger {
    executions: AtomicU64,
    charges: Mutex<Vec<ChargeReply>>,
    /// How long a charge takes, in milliseconds (a slow card network).
    delay_ms: AtomicU64,
    /// How many of the next charges fail with `UNAVAILABLE` after running.
    failures: AtomicU64,
}

impl Ledger {
    /// An empty ledger.
    pub fn new() -> Arc<Self> {
        Arc::new(Ledger::default())
    }

    /// How many times the handler ran (validation refusals not counted).
    pub fn executions(&self) -> u64 {
        self.executions.load(Ordering::SeqCst)
    }

    /// The charges made so far.
    pub fn charges(&self) -> Vec<ChargeReply> {
        self.charges.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Makes each charge take `delay` from now on.
    pub fn set_delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Makes the next `n` charges fail with `UNAVAILABLE` once they have run
    /// (a card network that timed out: nothing was charged).
    pub fn fail_next(&self, n: u64) {
        self.failures.store(n, Ordering::SeqCst);
    }

    /// `Charge`: validates the request, "calls the card network", records the
    /// charge and answers it, with its id also in the `x-charge-id` metadata.
    pub async fn charge(
        &self,
        request: Request<ChargeRequest>,
    ) -> Result<Response<ChargeReply>, Status> {
        let request = request.into_inner();
        if request.account.is_empty() || request.account.len() > 64 {
            return Err(Status::invalid_argument(
                "account must be 1 to 64 characters",
            ));
        }
        if request.amount_cents <= 0 {
            return Err(Status::invalid_argument("amount_cents must be positive"));
        }
        if request.currency.len() != 3 {
            return Err(Status::invalid_argument(
                "currency must be a three-letter ISO 4217 code",
            ));
        }
        let execution = self.executions.fetch_add(1, Ordering::SeqCst) + 1;
        let delay = self.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let failed = self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failed {
            return Err(Status::unavailable(
                "the card network timed out; nothing was charged",
            ));
        }
        let reply = ChargeReply {
            charge_id: format!("ch_{execution:06}"),
            account: request.account,
            amount_cents: request.amount_cents,
            currency: request.currency,
            execution,
        };
        if let Ok(mut charges) = self.charges.lock() {
            charges.push(reply.clone());
        }
        let mut response = Response::new(reply.clone());
        if let Ok(id) = MetadataValue::try_from(reply.charge_id.as_str()) {
            response.metadata_mut().insert("x-charge-id", id);
        }
        Ok(response)
    }
}

/// The subject a call's `authorization: Bearer <user>` metadata names (the
/// scheme in any case): the example's stand-in for real authentication, and
/// the scope of its keys.
pub fn bearer_subject(parts: &tonic::codegen::http::request::Parts) -> Option<String> {
    let value = parts.headers.get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| token.to_owned())
}

/// The layer the service runs behind: keys required on every call, kept per
/// user ([`bearer_subject`]), records in `store`.
pub fn layer(store: impl Store + 'static) -> IdempotencyLayer {
    IdempotencyLayer::new(store)
        .require_key(true)
        .scope(bearer_subject)
}

/// Serves `Payments` (charging through `ledger`) behind `layer` on `listener`
/// until the task is dropped or the server fails.
pub async fn serve(
    listener: TcpListener,
    layer: IdempotencyLayer,
    ledger: Arc<Ledger>,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .layer(layer)
        .add_service(PaymentsServer::new(ledger))
        .serve_with_incoming(TcpIncoming::from(listener))
        .await
}
