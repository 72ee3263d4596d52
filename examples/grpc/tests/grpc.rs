//! The payments service end to end: a tonic server behind `IdempotencyLayer`
//! on 127.0.0.1, a tonic client, real stores (SQLite file, PostgreSQL, Redis
//! on 127.0.0.1). docs/CONTRACT.md §6.2.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use grpc_example::{layer, serve, ChargeReply, ChargeRequest, Ledger, PaymentsClient};
use idem_runtime::http::IdempotencyLayer;
use idem_runtime::key::KeyBuilder;
use idem_runtime::{
    async_trait, Claim, ClaimRequest, Error, FencingToken, PostgresStore, Record, RedisStore,
    SqliteStore, Store,
};
use prost::Message as _;
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Status};

/// A name no other test run uses.
fn unique(prefix: &str) -> String {
    static COUNT: AtomicUsize = AtomicUsize::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let n = COUNT.fetch_add(1, Ordering::SeqCst);
    format!("{prefix}_{}_{nanos}_{n}", std::process::id())
}

async fn sqlite() -> SqliteStore {
    let path = std::env::temp_dir().join(format!("{}.db", unique("grpc_example")));
    SqliteStore::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap()
}

async fn postgres() -> PostgresStore {
    let url = std::env::var("IDEM_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    PostgresStore::connect(&url).await.unwrap()
}

async fn redis() -> RedisStore {
    let url = std::env::var("IDEM_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    RedisStore::connect(&url).await.unwrap()
}

/// A served payments service and a client for it.
struct Served {
    ledger: Arc<Ledger>,
    client: PaymentsClient,
    namespace: String,
    addr: std::net::SocketAddr,
}

/// Serves the payments service behind `layer`, with a namespace of its own.
async fn serve_behind(layer: IdempotencyLayer) -> Served {
    let namespace = unique("grpc");
    let layer = layer.namespace(namespace.clone());
    let ledger = Ledger::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, layer, Arc::clone(&ledger)));
    let client = PaymentsClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    Served {
        ledger,
        client,
        namespace,
        addr,
    }
}

impl Served {
    /// The key ann's calls with `key` are stored under.
    fn storage_key(&self, key: &str) -> String {
        KeyBuilder::new(&self.namespace)
            .part(&("scope", Some("ann")))
            .part(key)
            .finish()
            .unwrap()
            .as_str()
            .to_owned()
    }
}

fn charge(amount_cents: i64) -> ChargeRequest {
    ChargeRequest {
        account: "acct-1".into(),
        amount_cents,
        currency: "EUR".into(),
    }
}

/// A call as ann (`authorization: Bearer ann`), with `key` if given.
fn call(key: Option<&str>, message: ChargeRequest) -> Request<ChargeRequest> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", "Bearer ann".parse().unwrap());
    if let Some(key) = key {
        request
            .metadata_mut()
            .insert("idempotency-key", key.parse().unwrap());
    }
    request
}

fn replayed(metadata: &MetadataMap) -> bool {
    metadata
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true")
}

/// The metadata a reply carries that the layer replays: all of it but the
/// replay marker and the `date` the HTTP server adds to every response.
fn replayable(metadata: &MetadataMap) -> Vec<(String, Vec<u8>)> {
    let mut headers = metadata.clone().into_headers();
    headers.remove("date");
    headers.remove("idempotent-replayed");
    let mut all: Vec<(String, Vec<u8>)> = headers
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect();
    all.sort();
    all
}

// The parts of `google.rpc.Status` the layer sends in `grpc-status-details-bin`.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<Any>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Any {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ErrorInfo {
    #[prost(string, tag = "1")]
    reason: String,
    #[prost(string, tag = "2")]
    domain: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RetryInfo {
    #[prost(message, optional, tag = "1")]
    retry_delay: Option<ProtoDuration>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ProtoDuration {
    #[prost(int64, tag = "1")]
    seconds: i64,
    #[prost(int32, tag = "2")]
    nanos: i32,
}

/// The layer's answer to a retry of a reply it did not store: the first
/// call was run, and is not run again.
fn assert_not_stored(err: &Status) {
    assert_eq!(
        layer_error(err, Code::FailedPrecondition).0,
        "RESPONSE_NOT_STORED"
    );
    assert!(replayed(err.metadata()));
}

/// The `ErrorInfo` reason of one of the layer's answers, checked against its
/// code and message; and its `RetryInfo` delay, if any.
fn layer_error(status: &Status, code: Code) -> (String, Option<Duration>) {
    assert_eq!(status.code(), code, "{status:?}");
    let details = RpcStatus::decode(status.details()).expect("grpc-status-details-bin");
    assert_eq!(details.code, code as i32);
    assert_eq!(details.message, status.message());
    let mut reason = None;
    let mut retry = None;
    for any in details.details {
        match any.type_url.as_str() {
            "type.googleapis.com/google.rpc.ErrorInfo" => {
                let info = ErrorInfo::decode(any.value.as_slice()).unwrap();
                assert_eq!(info.domain, "idem");
                reason = Some(info.reason);
            }
            "type.googleapis.com/google.rpc.RetryInfo" => {
                let info = RetryInfo::decode(any.value.as_slice()).unwrap();
                let d = info.retry_delay.unwrap();
                retry = Some(Duration::new(d.seconds as u64, d.nanos as u32));
            }
            other => panic!("unexpected detail {other}"),
        }
    }
    (reason.expect("an ErrorInfo"), retry)
}

#[tokio::test]
async fn a_retry_replays_the_first_reply_metadata_and_trailers_exactly() {
    let store = sqlite().await;
    let s = serve_behind(layer(store.clone())).await;
    let mut client = s.client.clone();

    let first = client.charge(call(Some("k1"), charge(500))).await.unwrap();
    assert!(!replayed(first.metadata()));
    let second = client.charge(call(Some("k1"), charge(500))).await.unwrap();
    assert!(replayed(second.metadata()));
    assert_eq!(s.ledger.executions(), 1);
    assert_eq!(s.ledger.charges().len(), 1);
    assert_eq!(replayable(first.metadata()), replayable(second.metadata()));
    assert_eq!(first.metadata().get("x-charge-id").unwrap(), "ch_000001");
    assert_eq!(first.get_ref(), second.get_ref());
    assert_eq!(
        second.into_inner(),
        ChargeReply {
            charge_id: "ch_000001".into(),
            account: "acct-1".into(),
            amount_cents: 500,
            currency: "EUR".into(),
            execution: 1,
        }
    );

    // What the record holds: the headers, the framed message, the trailers.
    let record = store.get(&s.storage_key("k1")).await.unwrap().unwrap();
    let outcome: serde_json::Value = serde_json::from_slice(&record.outcome.unwrap()).unwrap();
    let stored = &outcome["ok"];
    assert_eq!(stored["status"], 200);
    let headers = stored["headers"].as_array().unwrap();
    assert!(headers.contains(&serde_json::json!(["content-type", "application/grpc"])));
    assert!(headers.contains(&serde_json::json!(["x-charge-id", "ch_000001"])));
    assert_eq!(
        stored["trailers"],
        serde_json::json!([["grpc-status", "0"]]),
        "{stored}"
    );
    // One length-prefixed message, binary so base64.
    let framed = stored["body"]["base64"].as_str().expect("a binary body");
    assert!(!framed.is_empty());
}

#[tokio::test]
async fn the_same_key_with_another_request_is_invalid_argument() {
    let s = serve_behind(layer(sqlite().await)).await;
    let mut client = s.client.clone();
    client.charge(call(Some("k"), charge(500))).await.unwrap();
    let err = client
        .charge(call(Some("k"), charge(501)))
        .await
        .unwrap_err();
    let (reason, retry) = layer_error(&err, Code::InvalidArgument);
    assert_eq!(reason, "KEY_REUSED");
    assert_eq!(retry, None);
    assert_eq!(s.ledger.executions(), 1);
    // The first request still replays.
    let again = client.charge(call(Some("k"), charge(500))).await.unwrap();
    assert!(replayed(again.metadata()));
}

#[tokio::test]
async fn missing_and_malformed_keys_and_unknown_clients_are_refused_before_the_handler() {
    let s = serve_behind(layer(sqlite().await)).await;
    let mut client = s.client.clone();
    let err = client.charge(call(None, charge(500))).await.unwrap_err();
    assert_eq!(
        layer_error(&err, Code::InvalidArgument).0,
        "KEY_MISSING",
        "{err:?}"
    );
    let err = client
        .charge(call(Some("tab\there"), charge(500)))
        .await
        .unwrap_err();
    assert_eq!(layer_error(&err, Code::InvalidArgument).0, "KEY_MALFORMED");
    let mut anonymous = Request::new(charge(500));
    anonymous
        .metadata_mut()
        .insert("idempotency-key", "k".parse().unwrap());
    let err = client.charge(anonymous).await.unwrap_err();
    assert_eq!(layer_error(&err, Code::Unauthenticated).0, "SCOPE_UNKNOWN");
    assert_eq!(s.ledger.executions(), 0);
}

/// 32 concurrent calls with one key: one runs, the others are `ABORTED` with
/// a retry hint, and every retry after it finished gets its reply.
async fn exactly_one_execution_under_concurrent_duplicates(store: impl Store + 'static) {
    let s = serve_behind(layer(store)).await;
    s.ledger.set_delay(Duration::from_millis(300));
    let calls: Vec<_> = (0..32)
        .map(|_| {
            let mut client = s.client.clone();
            tokio::spawn(async move { client.charge(call(Some("dup"), charge(700))).await })
        })
        .collect();
    let mut replies = Vec::new();
    let mut aborted = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(reply) => replies.push(reply),
            Err(status) => {
                let (reason, retry) = layer_error(&status, Code::Aborted);
                assert_eq!(reason, "IN_PROGRESS");
                let retry = retry.expect("a RetryInfo");
                assert!(retry >= Duration::from_secs(1), "{retry:?}");
                let pushback: u64 = status
                    .metadata()
                    .get("grpc-retry-pushback-ms")
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert_eq!(u128::from(pushback), retry.as_millis());
                aborted += 1;
            }
        }
    }
    assert_eq!(s.ledger.executions(), 1);
    assert_eq!(replies.len() + aborted, 32);
    assert!(!replies.is_empty());
    assert!(aborted >= 1, "the calls overlapped the 300 ms charge");
    let mut client = s.client.clone();
    let retry = client.charge(call(Some("dup"), charge(700))).await.unwrap();
    assert!(replayed(retry.metadata()));
    for reply in &replies {
        assert_eq!(reply.get_ref(), retry.get_ref());
    }
    assert_eq!(retry.get_ref().charge_id, "ch_000001");
    assert_eq!(s.ledger.executions(), 1);
}

#[tokio::test]
async fn exactly_one_execution_under_32_concurrent_duplicates_on_sqlite() {
    exactly_one_execution_under_concurrent_duplicates(sqlite().await).await;
}

#[tokio::test]
async fn exactly_one_execution_under_32_concurrent_duplicates_on_postgres() {
    exactly_one_execution_under_concurrent_duplicates(postgres().await).await;
}

#[tokio::test]
async fn exactly_one_execution_under_32_concurrent_duplicates_on_redis() {
    exactly_one_execution_under_concurrent_duplicates(redis().await).await;
}

#[tokio::test]
async fn a_handler_error_status_releases_the_key_so_the_retry_runs() {
    let store = sqlite().await;
    let s = serve_behind(layer(store.clone())).await;
    let mut client = s.client.clone();
    s.ledger.fail_next(1);
    let err = client
        .charge(call(Some("flaky"), charge(900)))
        .await
        .unwrap_err();
    // The handler's own status, passed through (no layer details).
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.details().is_empty());
    assert!(store.get(&s.storage_key("flaky")).await.unwrap().is_none());

    let ok = client
        .charge(call(Some("flaky"), charge(900)))
        .await
        .unwrap();
    assert!(!replayed(ok.metadata()));
    assert_eq!(ok.get_ref().execution, 2);
    let again = client
        .charge(call(Some("flaky"), charge(900)))
        .await
        .unwrap();
    assert!(replayed(again.metadata()));
    assert_eq!(s.ledger.executions(), 2);
    assert_eq!(s.ledger.charges().len(), 1);
}

#[tokio::test]
async fn an_error_status_chosen_for_storing_replays_as_a_trailers_only_reply() {
    // `INVALID_ARGUMENT` from the handler stored on purpose.
    let s =
        serve_behind(layer(sqlite().await).store_grpc_status(|code| {
            code == Code::Ok as i32 || code == Code::InvalidArgument as i32
        }))
        .await;
    let mut client = s.client.clone();
    let first = client
        .charge(call(Some("bad"), charge(-1)))
        .await
        .unwrap_err();
    assert_eq!(first.code(), Code::InvalidArgument);
    assert!(!replayed(first.metadata()));
    let second = client
        .charge(call(Some("bad"), charge(-1)))
        .await
        .unwrap_err();
    assert_eq!(second.code(), Code::InvalidArgument);
    assert_eq!(second.message(), first.message());
    assert!(replayed(second.metadata()));
}

#[tokio::test]
async fn a_client_that_gives_up_does_not_cut_the_charge_off() {
    let s = serve_behind(layer(sqlite().await)).await;
    s.ledger.set_delay(Duration::from_millis(400));
    let mut client = s.client.clone();
    let mut impatient = call(Some("cancel"), charge(300));
    impatient.set_timeout(Duration::from_millis(50));
    let err = client.charge(impatient).await.unwrap_err();
    // tonic's client reports its own timeout as `CANCELLED`.
    assert!(
        matches!(err.code(), Code::Cancelled | Code::DeadlineExceeded),
        "{err:?}"
    );
    assert_eq!(s.ledger.executions(), 1, "the charge had started");
    // The charge finishes on the server and is stored; the retry replays it.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let retry = client
        .charge(call(Some("cancel"), charge(300)))
        .await
        .unwrap();
    assert!(replayed(retry.metadata()));
    assert_eq!(s.ledger.executions(), 1);
}

#[tokio::test]
async fn a_huge_request_is_resource_exhausted_and_never_runs() {
    let s = serve_behind(layer(sqlite().await)).await;
    let mut client = s.client.clone();
    let mut huge = charge(100);
    huge.account = "x".repeat(2 << 20);
    let err = client.charge(call(Some("huge"), huge)).await.unwrap_err();
    assert_eq!(
        layer_error(&err, Code::ResourceExhausted).0,
        "REQUEST_TOO_LARGE"
    );
    assert_eq!(s.ledger.executions(), 0);
}

#[tokio::test]
async fn a_reply_over_the_limit_is_answered_once_and_never_run_again() {
    let s = serve_behind(layer(sqlite().await).max_response_body(16)).await;
    let mut client = s.client.clone();
    let first = client.charge(call(Some("big"), charge(100))).await.unwrap();
    assert_eq!(first.get_ref().execution, 1);
    let err = client
        .charge(call(Some("big"), charge(100)))
        .await
        .unwrap_err();
    assert_not_stored(&err);
    assert_eq!(s.ledger.executions(), 1);
}

/// A store that is down: every operation fails.
#[derive(Clone)]
struct DownStore;

#[async_trait]
impl Store for DownStore {
    async fn claim(&self, _: ClaimRequest<'_>) -> Result<Claim, Error> {
        Err(Error::store("connection refused"))
    }
    async fn complete(&self, _: &str, _: FencingToken, _: &[u8], _: Duration) -> Result<(), Error> {
        Err(Error::store("connection refused"))
    }
    async fn release(&self, _: &str, _: FencingToken) -> Result<(), Error> {
        Err(Error::store("connection refused"))
    }
    async fn renew(&self, _: &str, _: FencingToken, _: Duration) -> Result<(), Error> {
        Err(Error::store("connection refused"))
    }
    async fn get(&self, _: &str) -> Result<Option<Record>, Error> {
        Err(Error::store("connection refused"))
    }
    async fn purge_expired(&self, _: usize) -> Result<u64, Error> {
        Err(Error::store("connection refused"))
    }
    fn handle(&self) -> Arc<dyn Store> {
        Arc::new(self.clone())
    }
}

#[tokio::test]
async fn a_store_that_is_down_is_unavailable_with_a_pushback_and_nothing_runs() {
    let s = serve_behind(layer(DownStore)).await;
    let mut client = s.client.clone();
    let err = client
        .charge(call(Some("k"), charge(100)))
        .await
        .unwrap_err();
    let (reason, retry) = layer_error(&err, Code::Unavailable);
    assert_eq!(reason, "STORE_UNAVAILABLE");
    assert_eq!(retry, Some(Duration::from_secs(1)));
    assert_eq!(
        err.metadata().get("grpc-retry-pushback-ms").unwrap(),
        "1000"
    );
    assert!(!err.message().contains("connection refused"));
    assert_eq!(s.ledger.executions(), 0);
}

// ---------------------------------------------------------------------------
// Replies tonic's own unary handling never makes, from a hand-made `Charge`
// endpoint: a message followed by trailers the test chooses.

use std::convert::Infallible;

use tonic::codegen::{http, Bytes};

/// What the hand-made endpoint answers.
#[derive(Clone)]
struct Shaped {
    runs: Arc<AtomicUsize>,
    /// The reply's headers, beside `content-type: application/grpc`.
    headers: Vec<(&'static str, &'static str)>,
    /// Its trailers (none at all if empty).
    trailers: Vec<(&'static str, &'static str)>,
}

impl tonic::server::NamedService for Shaped {
    const NAME: &'static str = grpc_example::proto::SERVICE;
}

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for Shaped {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<tonic::body::Body>) -> Self::Future {
        let run = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        let message = ChargeReply {
            charge_id: format!("ch_{run:06}"),
            account: "acct-1".into(),
            amount_cents: 500,
            currency: "EUR".into(),
            execution: run as u64,
        }
        .encode_to_vec();
        let mut framed = vec![0u8];
        framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
        framed.extend_from_slice(&message);
        let mut frames = vec![Ok::<_, Infallible>(http_body::Frame::data(Bytes::from(
            framed,
        )))];
        if !self.trailers.is_empty() {
            let mut trailers = http::HeaderMap::new();
            for (name, value) in &self.trailers {
                trailers.append(*name, value.parse().unwrap());
            }
            frames.push(Ok(http_body::Frame::trailers(trailers)));
        }
        let body = http_body_util::StreamBody::new(futures::stream::iter(frames));
        let mut response = http::Response::new(tonic::body::Body::new(body));
        let headers = response.headers_mut();
        headers.insert("content-type", "application/grpc".parse().unwrap());
        for (name, value) in &self.headers {
            headers.append(*name, value.parse().unwrap());
        }
        std::future::ready(Ok(response))
    }
}

/// Serves `shaped` behind `layer` (keys required, scope from the bearer);
/// returns a client and the endpoint's run counter.
async fn serve_shaped(
    layer: IdempotencyLayer,
    headers: Vec<(&'static str, &'static str)>,
    trailers: Vec<(&'static str, &'static str)>,
) -> (PaymentsClient, Arc<AtomicUsize>) {
    let runs = Arc::new(AtomicUsize::new(0));
    let shaped = Shaped {
        runs: Arc::clone(&runs),
        headers,
        trailers,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let layer = layer.namespace(unique("grpc_shaped"));
    tokio::spawn(
        tonic::transport::Server::builder()
            .layer(layer)
            .add_service(shaped)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let client = PaymentsClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    (client, runs)
}

#[tokio::test]
async fn a_message_followed_by_error_trailers_is_not_stored() {
    // Headers that look like success, a whole message, then `INTERNAL` in the
    // trailers: the final status is what counts.
    let (mut client, runs) = serve_shaped(
        layer(sqlite().await),
        vec![],
        vec![
            ("grpc-status", "13"),
            ("grpc-message", "ledger%20write%20failed"),
        ],
    )
    .await;
    let err = client
        .charge(call(Some("k"), charge(500)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert_eq!(err.message(), "ledger write failed");
    let err = client
        .charge(call(Some("k"), charge(500)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal);
    assert!(!replayed(err.metadata()));
    assert_eq!(runs.load(Ordering::SeqCst), 2, "released, so the retry ran");
}

#[tokio::test]
async fn an_ok_in_the_headers_is_overruled_by_an_error_in_the_trailers() {
    let (mut client, runs) = serve_shaped(
        layer(sqlite().await),
        vec![("grpc-status", "0")],
        vec![("grpc-status", "14")],
    )
    .await;
    let _ = client.charge(call(Some("k"), charge(500))).await;
    let _ = client.charge(call(Some("k"), charge(500))).await;
    assert_eq!(runs.load(Ordering::SeqCst), 2, "never stored");
}

/// A reply that ends without any `grpc-status`: tonic's client takes its
/// message for a success, so the charge must never run again; it cannot be
/// replayed either (it is broken), so it is recorded as done without a reply.
#[tokio::test]
async fn a_reply_without_any_grpc_status_is_recorded_as_done_and_never_run_again() {
    let (mut client, runs) = serve_shaped(layer(sqlite().await), vec![], vec![]).await;
    let first = client.charge(call(Some("k"), charge(500))).await;
    // What the first client makes of it is its client's business (tonic: OK).
    if let Ok(reply) = &first {
        assert_eq!(reply.get_ref().execution, 1);
    }
    let err = client
        .charge(call(Some("k"), charge(500)))
        .await
        .unwrap_err();
    assert_not_stored(&err);
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the retry ran the charge again"
    );
}

#[tokio::test]
async fn trailing_metadata_replays_exactly_without_set_cookie() {
    let store = sqlite().await;
    let (mut client, runs) = serve_shaped(
        layer(store.clone()),
        vec![("x-head", "h1")],
        vec![
            ("grpc-status", "0"),
            ("x-trace", "t-1"),
            ("x-trace", "t-2"),
            ("Set-Cookie", "sid=secret"),
        ],
    )
    .await;
    let first = client.charge(call(Some("k"), charge(500))).await.unwrap();
    assert_eq!(first.metadata().get("set-cookie").unwrap(), "sid=secret");
    let second = client.charge(call(Some("k"), charge(500))).await.unwrap();
    assert!(replayed(second.metadata()));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(first.get_ref(), second.get_ref());
    let traces: Vec<_> = second
        .metadata()
        .get_all("x-trace")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    assert_eq!(traces, ["t-1", "t-2"]);
    assert_eq!(second.metadata().get("x-head").unwrap(), "h1");
    assert!(second.metadata().get("set-cookie").is_none());
}

#[tokio::test]
async fn a_client_that_resets_its_stream_mid_call_does_not_cut_the_charge_off() {
    // No deadline: the client drops the call, so its HTTP/2 stream is reset
    // (RST_STREAM CANCEL) while the handler runs.
    let s = serve_behind(layer(postgres().await)).await;
    s.ledger.set_delay(Duration::from_millis(400));
    let mut client = s.client.clone();
    let call_task =
        tokio::spawn(async move { client.charge(call(Some("rst"), charge(300))).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    call_task.abort();
    assert!(call_task.await.unwrap_err().is_cancelled());
    assert_eq!(s.ledger.executions(), 1);
    // While the charge still runs, a retry is told to come back.
    let mut client = s.client.clone();
    let err = client
        .charge(call(Some("rst"), charge(300)))
        .await
        .unwrap_err();
    assert_eq!(layer_error(&err, Code::Aborted).0, "IN_PROGRESS");
    tokio::time::sleep(Duration::from_millis(700)).await;
    let retry = client.charge(call(Some("rst"), charge(300))).await.unwrap();
    assert!(replayed(retry.metadata()));
    assert_eq!(retry.get_ref().execution, 1);
    assert_eq!(s.ledger.executions(), 1);
}

#[tokio::test]
async fn exactly_one_execution_for_duplicates_over_many_connections_on_redis() {
    let s = serve_behind(layer(redis().await)).await;
    s.ledger.set_delay(Duration::from_millis(200));
    // A connection of its own per caller.
    let mut clients = Vec::new();
    for _ in 0..12 {
        clients.push(
            PaymentsClient::connect(format!("http://{}", s.addr))
                .await
                .unwrap(),
        );
    }
    let calls: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            tokio::spawn(async move { client.charge(call(Some("many"), charge(700))).await })
        })
        .collect();
    let mut ok = 0;
    for call in calls {
        if call.await.unwrap().is_ok() {
            ok += 1;
        }
    }
    assert!(ok >= 1);
    assert_eq!(s.ledger.executions(), 1);
}
