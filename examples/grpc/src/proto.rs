//! The `payments.v1` protocol, written out by hand so the build needs no
//! `protoc` and no code generation: what `tonic-build` would emit for
//!
//! ```proto
//! syntax = "proto3";
//! package payments.v1;
//!
//! service Payments {
//!   rpc Charge(ChargeRequest) returns (ChargeReply);
//! }
//! message ChargeRequest { string account = 1; int64 amount_cents = 2; string currency = 3; }
//! message ChargeReply {
//!   string charge_id = 1; string account = 2; int64 amount_cents = 3;
//!   string currency = 4; uint64 execution = 5;
//! }
//! ```
//!
//! cut down to one unary method: the messages derive `prost::Message`, the
//! server routes by path into tonic's unary handling, and the client sends
//! through `tonic::client::Grpc`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::codegen::{http, Body, Bytes, GrpcMethod, Service, StdError};
use tonic::transport::Channel;
use tonic::{IntoRequest, Request, Response, Status};

use crate::Ledger;

/// The gRPC service name.
pub const SERVICE: &str = "payments.v1.Payments";
/// The path of `Charge`.
pub const CHARGE_PATH: &str = "/payments.v1.Payments/Charge";

/// `payments.v1.ChargeRequest`: charge `amount_cents` to `account`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct ChargeRequest {
    /// The account charged.
    #[prost(string, tag = "1")]
    pub account: String,
    /// The amount, in cents; must be positive.
    #[prost(int64, tag = "2")]
    pub amount_cents: i64,
    /// ISO 4217 currency code.
    #[prost(string, tag = "3")]
    pub currency: String,
}

/// `payments.v1.ChargeReply`: the charge made.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct ChargeReply {
    /// The charge's id (`ch_000001`, …).
    #[prost(string, tag = "1")]
    pub charge_id: String,
    /// The account charged.
    #[prost(string, tag = "2")]
    pub account: String,
    /// The amount charged, in cents.
    #[prost(int64, tag = "3")]
    pub amount_cents: i64,
    /// The currency.
    #[prost(string, tag = "4")]
    pub currency: String,
    /// Which run of the handler made it (1 for the first charge the server made).
    #[prost(uint64, tag = "5")]
    pub execution: u64,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send + 'static>>;

/// The server side: routes `Charge` to the [`Ledger`]; any other path is
/// `UNIMPLEMENTED`.
#[derive(Debug, Clone)]
pub struct PaymentsServer {
    ledger: Arc<Ledger>,
}

impl PaymentsServer {
    /// A server charging through `ledger`.
    pub fn new(ledger: Arc<Ledger>) -> Self {
        PaymentsServer { ledger }
    }
}

impl tonic::server::NamedService for PaymentsServer {
    const NAME: &'static str = SERVICE;
}

/// `Charge` as tonic's unary handling calls it.
struct Charge(Arc<Ledger>);

impl tonic::server::UnaryService<ChargeRequest> for Charge {
    type Response = ChargeReply;
    type Future = BoxFuture<Response<ChargeReply>, Status>;

    fn call(&mut self, request: Request<ChargeRequest>) -> Self::Future {
        let ledger = Arc::clone(&self.0);
        Box::pin(async move { ledger.charge(request).await })
    }
}

impl<B> Service<http::Request<B>> for PaymentsServer
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != CHARGE_PATH {
            return Box::pin(async { Ok(Status::unimplemented("no such method").into_http()) });
        }
        let charge = Charge(Arc::clone(&self.ledger));
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
            Ok(grpc.unary(charge, request).await)
        })
    }
}

/// The client side.
#[derive(Debug, Clone)]
pub struct PaymentsClient {
    inner: tonic::client::Grpc<Channel>,
}

impl PaymentsClient {
    /// A client on `channel`.
    pub fn new(channel: Channel) -> Self {
        PaymentsClient {
            inner: tonic::client::Grpc::new(channel),
        }
    }

    /// Connects to `url` (`http://127.0.0.1:50051`).
    pub async fn connect(url: String) -> Result<Self, StdError> {
        Ok(Self::new(Channel::from_shared(url)?.connect().await?))
    }

    /// `Charge`. Put the key in the request's `idempotency-key` metadata.
    pub async fn charge(
        &mut self,
        request: impl IntoRequest<ChargeRequest>,
    ) -> Result<Response<ChargeReply>, Status> {
        self.inner
            .ready()
            .await
            .map_err(|e| Status::unavailable(format!("the service was not ready: {e}")))?;
        let mut request = request.into_request();
        request
            .extensions_mut()
            .insert(GrpcMethod::new(SERVICE, "Charge"));
        let path = http::uri::PathAndQuery::from_static(CHARGE_PATH);
        self.inner
            .unary(request, path, tonic_prost::ProstCodec::default())
            .await
    }
}
