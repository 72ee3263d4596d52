//! The order API as the original service defines it (issue 13, part 2): string
//! ids, problems for every refusal (never quoting the input), unknown products,
//! the bearer scheme in any case, and a server that closes idle and stalled
//! connections, purges expired records and honours `RUST_LOG`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use idem_runtime::{Claim, ClaimRequest, RecordState, Store};
use order_service::payments::CARD_OK;
use order_service::server::{self, Running, Settings};
use order_service::{Db, OrderService};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn unique() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{nanos}-{}", NEXT.fetch_add(1, Ordering::SeqCst))
}

fn sqlite_file() -> String {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("api-{}", unique()));
    std::fs::create_dir_all(&dir).unwrap();
    format!("sqlite://{}/orders.db", dir.display())
}

async fn start_with(settings: Settings, key_store: Option<&str>) -> (Running, OrderService) {
    let service = OrderService::new(Db::open(&sqlite_file()).await.unwrap());
    service.seed_catalogue().await.unwrap();
    let keys = server::key_store(key_store, service.db()).await.unwrap();
    let running = server::start_service("127.0.0.1:0", service.clone(), keys, settings)
        .await
        .unwrap();
    (running, service)
}

async fn start() -> (Running, OrderService) {
    start_with(Settings::default(), None).await
}

async fn send(base: &str, path: &str, auth: &str, key: &str, body: Vec<u8>) -> (u16, bool, Value) {
    let r = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .header("Authorization", auth)
        .header("Idempotency-Key", key)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let replayed = r.headers().contains_key("idempotent-replayed");
    let problem = r
        .headers()
        .get("content-type")
        .is_some_and(|v| v == "application/problem+json");
    let bytes = r.bytes().await.unwrap();
    let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if status >= 400 {
        assert!(problem, "{status} is problem+json: {bytes:?}");
        assert!(bytes.len() < 1024, "a short problem: {} bytes", bytes.len());
    }
    (status, replayed, value)
}

fn body(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap()
}

#[tokio::test]
async fn the_original_request_shape_runs_end_to_end() {
    let (running, service) = start().await;
    let base = running.url();
    let user = format!("user-{}", unique());
    let order = json!({ "user_id": user, "product_id": "SKU-0003", "quantity": 2 });
    let (status, _, created) = send(&base, "/orders", "Bearer ann", "o-1", body(&order)).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["user_id"], user.as_str());
    assert_eq!(created["product_id"], "SKU-0003");
    assert_eq!(created["quantity"], 2);
    // The id exactly as POST /orders returned it.
    let payment = json!({ "order_id": created["id"], "amount_cents": 3998, "card": CARD_OK });
    let (status, _, charge) = send(&base, "/payments", "Bearer ann", "p-1", body(&payment)).await;
    assert_eq!(status, 201, "{charge}");
    assert_eq!(charge["order_id"], created["id"]);
    let got: Value = reqwest::get(format!("{base}/orders/{}", created["id"]))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got, created);
    assert_eq!(service.orders_of(&[&user]).await.unwrap(), 1);
    running.stop().await.unwrap();
}

#[tokio::test]
async fn every_bad_body_is_a_problem_that_quotes_nothing_and_keeps_the_key_free() {
    let (running, service) = start().await;
    let base = running.url();
    let huge = "Z".repeat(500_000);
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"{not json".to_vec(), 400, "JSON"),
        (b"".to_vec(), 400, "JSON"),
        (b"[]".to_vec(), 400, "object"),
        (
            body(&json!({ "user_id": 1, "product_id": "SKU-0001", "quantity": 1 })),
            422,
            "user_id",
        ),
        (
            body(&json!({ "user_id": huge, "product_id": "SKU-0001", "quantity": 1 })),
            422,
            "user_id",
        ),
        (
            body(&json!({ "user_id": "u", "product_id": huge, "quantity": 1 })),
            422,
            "product_id",
        ),
        (
            body(&json!({ "user_id": "u", "quantity": 1 })),
            422,
            "product_id",
        ),
        (
            body(&json!({ "user_id": "u", "product_id": "SKU-0001", "quantity": 0 })),
            422,
            "quantity",
        ),
        (
            body(
                &json!({ "user_id": "u", "product_id": "SKU-0001", "quantity": 3_000_000_000u64 }),
            ),
            422,
            "quantity",
        ),
        (
            br#"{"user_id":"u","product_id":"SKU-0001","quantity":1e400}"#.to_vec(),
            400,
            "JSON",
        ),
        (
            body(&json!({ "user_id": "u", "product_id": "SKU-0001", "quantity": "1" })),
            422,
            "quantity",
        ),
        (
            body(
                &json!({ "user_id": "u", "product_id": "SKU-0001", "quantity": 1, "ship_to": huge }),
            ),
            422,
            "ship_to",
        ),
    ];
    for (n, (bad, status, field)) in cases.into_iter().enumerate() {
        let key = format!("bad-{n}");
        let (got, _, problem) = send(&base, "/orders", "Bearer ann", &key, bad).await;
        assert_eq!(got, status, "case {n}: {problem}");
        let detail = problem["detail"].as_str().unwrap();
        assert!(detail.contains(field), "case {n}: {detail}");
        assert!(!detail.contains("ZZZ"), "case {n} quotes the input");
        // Refusals are not stored: the corrected request under the same key runs.
        let good =
            json!({ "user_id": format!("fixed-{n}"), "product_id": "SKU-0001", "quantity": 1 });
        let (got, replayed, _) = send(&base, "/orders", "Bearer ann", &key, body(&good)).await;
        assert_eq!(
            (got, replayed),
            (201, false),
            "case {n}: the key stayed free"
        );
    }
    let bad_pay = json!({ "order_id": "1", "amount_cents": 5, "card": CARD_OK });
    let (got, _, problem) = send(&base, "/payments", "Bearer ann", "bad-pay", body(&bad_pay)).await;
    assert_eq!(got, 422, "{problem}");
    assert_eq!(service.orders_of(&["u"]).await.unwrap(), 0);
    running.stop().await.unwrap();
}

#[tokio::test]
async fn an_unknown_product_is_404_and_an_empty_one_409() {
    let (running, service) = start().await;
    let base = running.url();
    let unknown = json!({ "user_id": "u", "product_id": "SKU-9999", "quantity": 1 });
    let (status, _, problem) = send(&base, "/orders", "Bearer ann", "k-1", body(&unknown)).await;
    assert_eq!(status, 404, "{problem}");
    assert_eq!(problem["type"], "urn:order-service:product-not-found");
    service.restock("SKU-EMPTY", 0).await.unwrap();
    let empty = json!({ "user_id": "u", "product_id": "SKU-EMPTY", "quantity": 1 });
    let (status, _, problem) = send(&base, "/orders", "Bearer ann", "k-2", body(&empty)).await;
    assert_eq!(status, 409, "{problem}");
    assert_eq!(problem["type"], "urn:order-service:out-of-stock");
    // The product appears: the same key runs (a 404 is not stored).
    service.restock("SKU-9999", 5).await.unwrap();
    let (status, _, _) = send(&base, "/orders", "Bearer ann", "k-1", body(&unknown)).await;
    assert_eq!(status, 201);
    running.stop().await.unwrap();
}

/// One payment key sent with `Bearer`, `bearer` and `BEARER` is one payment:
/// the card is charged once (before, three scopes and three charges).
#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive_and_one_key_charges_once() {
    let (running, service) = start().await;
    let base = running.url();
    let user = format!("user-{}", unique());
    let order = json!({ "user_id": user, "product_id": "SKU-0001", "quantity": 1 });
    let (_, _, created) = send(&base, "/orders", "Bearer ann", "o", body(&order)).await;
    let payment = json!({ "order_id": created["id"], "amount_cents": 1999, "card": CARD_OK });
    let mut first = None;
    for auth in [
        "Bearer ann",
        "bearer ann",
        "BEARER ann",
        "bEaReR   ann.refreshed",
    ] {
        let (status, replayed, charge) =
            send(&base, "/payments", auth, "pay", body(&payment)).await;
        assert_eq!(status, 201, "{auth}: {charge}");
        assert_eq!(replayed, first.is_some(), "{auth}");
        assert_eq!(first.get_or_insert(charge.clone()), &charge);
    }
    assert_eq!(service.charges_of(&[&user]).await.unwrap(), 1);
    for auth in ["", "Basic YW5uOng=", "Bearer", "Bearer   ", "Bearerann"] {
        let (status, _, _) = send(&base, "/payments", auth, "pay", body(&payment)).await;
        assert_eq!(status, 401, "{auth:?}");
    }
    running.stop().await.unwrap();
}

#[tokio::test]
async fn unknown_routes_wrong_methods_and_a_lost_database_are_problems() {
    let (running, service) = start_with(Settings::default(), Some("memory")).await;
    let base = running.url();
    let client = reqwest::Client::new();
    for (method, path, status) in [
        (reqwest::Method::GET, "/nowhere", 404),
        (reqwest::Method::DELETE, "/orders", 405),
        (reqwest::Method::GET, "/orders/not-a-number", 404),
    ] {
        let r = client
            .request(method, format!("{base}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{path}");
        assert_eq!(
            r.headers()["content-type"],
            "application/problem+json",
            "{path}"
        );
    }
    // The orders' database goes away; the key store (memory) stays.
    let Db::Sqlite(store) = service.db() else {
        unreachable!()
    };
    store.pool().close().await;
    let order = json!({ "user_id": "u", "product_id": "SKU-0001", "quantity": 1 });
    let r = client
        .post(format!("{base}/orders"))
        .header("Authorization", "Bearer ann")
        .header("Idempotency-Key", "gone")
        .json(&order)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers()["retry-after"], "1");
    let text = r.text().await.unwrap();
    assert!(!text.contains("pool"), "no internals: {text}");
    running.stop().await.unwrap();
}

/// Reads until the server closes the connection; what it sent before.
async fn until_closed(stream: &mut tokio::net::TcpStream) -> String {
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut out))
        .await
        .expect("the server closed the connection")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn idle_and_stalled_connections_are_closed() {
    let settings = Settings {
        header_read: Duration::from_millis(300),
        body_read: Duration::from_millis(300),
        ..Settings::default()
    };
    let (running, _) = start_with(settings, None).await;
    let addr = running.addr();
    // A connection that never sends anything.
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert_eq!(until_closed(&mut idle).await, "");
    // Headers that never finish.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"POST /orders HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    until_closed(&mut slow).await;
    // A body that stalls: 408, and the connection is closed.
    let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
    stalled
        .write_all(b"POST /orders HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ann\r\nIdempotency-Key: s\r\nContent-Length: 100\r\n\r\n{\"user")
        .await
        .unwrap();
    let answer = until_closed(&mut stalled).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("application/problem+json"), "{answer}");
    // A keep-alive connection is closed once idle, after its answer.
    let mut kept = tokio::net::TcpStream::connect(addr).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let answer = until_closed(&mut kept).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // A declared body over the limit is refused before it is sent when the
    // client waits for 100 Continue, or when it is too large to drain.
    for head in [
        "Content-Length: 2000000\r\nExpect: 100-continue",
        "Content-Length: 100000000",
    ] {
        let mut big = tokio::net::TcpStream::connect(addr).await.unwrap();
        big.write_all(format!("POST /orders HTTP/1.1\r\nHost: x\r\n{head}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let answer = until_closed(&mut big).await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{head}: {answer}");
    }
    running.stop().await.unwrap();
}

/// A client that sends a body over the limit whole, without waiting for
/// `100 Continue`, reads the 413 (the rest is read and discarded) instead of
/// a broken pipe.
#[tokio::test]
async fn a_body_over_the_limit_sent_whole_gets_its_413() {
    let (running, _) = start().await;
    for size in [(1 << 20) + 1, 2 << 20, 6 << 20] {
        let r = reqwest::Client::new()
            .post(format!("{}/orders", running.url()))
            .header("Authorization", "Bearer ann")
            .header("Idempotency-Key", "big")
            .body(vec![b' '; size])
            .send()
            .await
            .expect("an answer, not a broken pipe");
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE, "{size} bytes");
        assert_eq!(r.headers()["content-type"], "application/problem+json");
    }
    running.stop().await.unwrap();
}

#[tokio::test]
async fn expired_records_are_purged_while_the_server_runs() {
    let settings = Settings {
        reap_every: Duration::from_millis(20),
        ..Settings::default()
    };
    let (running, service) = start_with(settings, None).await;
    let Db::Sqlite(store) = service.db() else {
        unreachable!()
    };
    let key = format!("expiring-{}", unique());
    let Claim::Acquired { token, .. } = store
        .claim(ClaimRequest {
            key: &key,
            fingerprint: None,
            lease: Duration::from_secs(30),
        })
        .await
        .unwrap()
    else {
        panic!("a fresh key")
    };
    store
        .complete(&key, token, b"{\"ok\":1}", Duration::from_millis(1))
        .await
        .unwrap();
    let count = |pool: sqlx::SqlitePool, key: String| async move {
        sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM {} WHERE key = ?1",
            "idem_records"
        )))
        .bind(key)
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while count(store.pool().clone(), key.clone()).await > 0 {
        assert!(tokio::time::Instant::now() < deadline, "never purged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(store
        .get(&key)
        .await
        .unwrap()
        .is_none_or(|r| r.state != RecordState::Completed));
    running.stop().await.unwrap();
}

/// `order-service serve` logs as `RUST_LOG` says: nothing with `off`, the
/// layer's warnings with `warn`.
#[tokio::test]
async fn rust_log_is_honoured() {
    for (filter, expect_lines) in [("off", false), ("warn", true)] {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_order-service"))
            .args([
                "serve",
                "--addr",
                &addr,
                "--db",
                &sqlite_file(),
                "--key-store",
                "memory",
            ])
            .env("RUST_LOG", filter)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let base = format!("http://{addr}");
        let mut up = false;
        for _ in 0..300 {
            if reqwest::get(format!("{base}/healthz")).await.is_ok() {
                up = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(up, "order-service serve came up");
        // The same key with another body: the layer warns "key reused".
        let order = |q: u32| json!({ "user_id": "u", "product_id": "SKU-0001", "quantity": q });
        send(&base, "/orders", "Bearer ann", "k", body(&order(1))).await;
        let (status, _, _) = send(&base, "/orders", "Bearer ann", "k", body(&order(2))).await;
        assert_eq!(status, 422);
        child.start_kill().unwrap();
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .await
            .unwrap();
        assert_eq!(
            !stderr.is_empty(),
            expect_lines,
            "RUST_LOG={filter}: {stderr}"
        );
    }
}

// Found by the break-it review of issue 13.

/// Problems about a product name no product: the id is the client's input.
#[tokio::test]
async fn unknown_and_empty_product_problems_do_not_quote_the_product_id() {
    let (running, service) = start().await;
    let base = running.url();
    let product = format!("<script>{}", "Z".repeat(240));
    let order = json!({ "user_id": "u", "product_id": product, "quantity": 1 });
    let (status, _, problem) = send(&base, "/orders", "Bearer ann", "unknown", body(&order)).await;
    assert_eq!(status, 404);
    assert!(!problem.to_string().contains("ZZZ"), "{problem}");
    service.restock(&product, 0).await.unwrap();
    let (status, _, problem) = send(&base, "/orders", "Bearer ann", "empty", body(&order)).await;
    assert_eq!(status, 409);
    assert!(!problem.to_string().contains("ZZZ"), "{problem}");
    running.stop().await.unwrap();
}

fn postgres_url() -> String {
    std::env::var("IDEM_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// U+0000 passes JSON but not PostgreSQL's TEXT: it is refused as input (422),
/// never answered as an outage (503, "retry later").
#[tokio::test]
async fn a_nul_in_a_field_is_refused_as_input_not_as_an_outage_on_postgres() {
    let service = OrderService::new(Db::open(&postgres_url()).await.unwrap());
    service.seed_catalogue().await.unwrap();
    let keys = server::key_store(None, service.db()).await.unwrap();
    let running = server::start("127.0.0.1:0", service, keys).await.unwrap();
    let base = running.url();
    for (n, order) in [
        json!({ "user_id": "ann\u{0}", "product_id": "SKU-0001", "quantity": 1 }),
        json!({ "user_id": "ann", "product_id": "SKU-0001\u{0}", "quantity": 1 }),
        json!({ "user_id": "ann", "product_id": "SKU-0001", "quantity": 1, "ship_to": "a\u{0}b" }),
    ]
    .iter()
    .enumerate()
    {
        let key = format!("nul-{n}-{}", unique());
        let (status, _, problem) = send(&base, "/orders", "Bearer ann", &key, body(order)).await;
        assert_eq!(status, 422, "case {n}: {problem}");
    }
    running.stop().await.unwrap();
}

/// A database of its own on the local PostgreSQL, dropped when done.
struct OwnDatabase(String);

impl OwnDatabase {
    async fn create() -> OwnDatabase {
        let admin = sqlx::PgPool::connect(&postgres_url()).await.unwrap();
        let name = format!("order_service_{}", unique().replace('-', "_"));
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .unwrap();
        OwnDatabase(name)
    }

    fn url(&self) -> String {
        let base = postgres_url();
        let server = base.rsplit_once('/').map_or(base.as_str(), |(s, _)| s);
        format!("{server}/{}", self.0)
    }

    async fn drop(self) {
        let admin = sqlx::PgPool::connect(&postgres_url()).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.0
        )))
        .execute(&admin)
        .await
        .unwrap();
    }
}

/// An earlier version stopped after making only its numeric `orders` table:
/// the migration still sees an old database, keeps the table as `orders_v1`,
/// and orders work.
#[tokio::test]
async fn a_partially_made_v1_postgres_database_still_takes_orders() {
    let db = OwnDatabase::create().await;
    let pool = sqlx::PgPool::connect(&db.url()).await.unwrap();
    sqlx::query(
        "CREATE TABLE orders (
            id BIGSERIAL PRIMARY KEY, user_id BIGINT NOT NULL,
            product_id BIGINT NOT NULL, quantity INT NOT NULL,
            ship_to TEXT NOT NULL, total_cents BIGINT NOT NULL)",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
    let service = OrderService::new(Db::open(&db.url()).await.unwrap());
    service.seed_catalogue().await.unwrap();
    let keys = server::key_store(None, service.db()).await.unwrap();
    let running = server::start("127.0.0.1:0", service.clone(), keys)
        .await
        .unwrap();
    let order = json!({ "user_id": "ann", "product_id": "SKU-0001", "quantity": 1 });
    let (status, _, created) = send(
        &running.url(),
        "/orders",
        "Bearer ann",
        "partial",
        body(&order),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    running.stop().await.unwrap();
    let Db::Postgres(store) = service.db() else {
        unreachable!()
    };
    store.pool().close().await;
    db.drop().await;
}

/// A client that pipelines requests and never reads the answers loses its
/// connection once a write has waited `write_stall`, so it cannot hold its
/// place under the connection cap (here: one) forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_does_not_hold_its_connection_forever() {
    let settings = Settings {
        header_read: Duration::from_secs(5),
        body_read: Duration::from_secs(5),
        write_stall: Duration::from_millis(300),
        max_connections: 1,
        ..Settings::default()
    };
    let (running, _) = start_with(settings, None).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(running.addr()).await.unwrap();
    let writer = tokio::spawn(async move {
        let requests = b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n".repeat(1000);
        for _ in 0..40 {
            if stalled.write_all(&requests).await.is_err() {
                break;
            }
        }
        stalled
    });
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let other = client
            .get(format!("{}/healthz", running.url()))
            .send()
            .await;
        if other.is_ok_and(|r| r.status() == StatusCode::OK) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "still locked out");
    }
    writer.abort();
    running.stop().await.unwrap();
}

/// `POST /checkout` stopped after each of its first three steps (the demo's
/// injected failure): the client's retry resumes at the next step, and the
/// order ends with one charge, one shipment and one email.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkout_stopped_after_any_step_resumes_on_retry() {
    let (running, service) = start().await;
    let base = running.url();
    for (i, step) in ["reserve-stock", "charge", "ship"].into_iter().enumerate() {
        let user = format!("checkout-{i}-{}", unique());
        let body = serde_json::to_vec(&json!({
            "user_id": user, "product_id": "SKU-0001", "quantity": 1,
            "ship_to": "1 Test Street", "card": CARD_OK,
        }))
        .unwrap();
        let key = format!("checkout-{}", unique());
        let auth = format!("Bearer {user}");
        let stopped = reqwest::Client::new()
            .post(format!("{base}/checkout"))
            .header("Authorization", &auth)
            .header("Idempotency-Key", &key)
            .header(server::CRASH_AFTER, step)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(stopped.status(), 503, "stopped after {step}");
        let (status, replayed, receipt) = send(&base, "/checkout", &auth, &key, body.clone()).await;
        assert_eq!((status, replayed), (201, false), "{step}: {receipt}");
        let order = receipt["order"]["id"].as_i64().unwrap();
        assert_eq!(
            service.effects_of(order).await.unwrap(),
            (1, 1, 1),
            "after {step}"
        );
        assert_eq!(receipt["email"]["to"], user);
        let (status, replayed, again) = send(&base, "/checkout", &auth, &key, body).await;
        assert_eq!((status, replayed, &again), (201, true, &receipt));
        assert_eq!(service.orders_of(&[&user]).await.unwrap(), 1, "one order");
    }
    running.stop().await.unwrap();
}
