//! The order service over real sockets, with a real HTTP client: duplicates,
//! scopes, replays, restarts, and several server processes on one database.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use order_service::payments::CARD_OK;
use order_service::server::{self, Running};
use order_service::{Db, OrderService};
use reqwest::StatusCode;
use serde_json::json;

fn postgres_url() -> String {
    std::env::var("IDEM_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn redis_url() -> String {
    std::env::var("IDEM_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Ids no other test (or earlier run on the same database) uses.
fn fresh_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    (now % 1_000_000_000_000) * 1000 + NEXT.fetch_add(1, Ordering::SeqCst) % 1000
}

/// A user and a product (a SKU) no other test uses.
fn user_and_product() -> (String, String) {
    let n = fresh_id();
    (format!("user-{n}"), format!("SKU-{n}"))
}

fn sqlite_file(name: &str) -> String {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("http-{name}-{}", fresh_id()));
    std::fs::create_dir_all(&dir).unwrap();
    format!("sqlite://{}/orders.db", dir.display())
}

async fn start(db: &str, key_store: Option<&str>) -> (Running, OrderService) {
    let service = OrderService::new(Db::open(db).await.unwrap());
    let keys = server::key_store(key_store, service.db()).await.unwrap();
    let running = server::start("127.0.0.1:0", service.clone(), keys)
        .await
        .unwrap();
    (running, service)
}

struct Reply {
    status: StatusCode,
    replayed: bool,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

async fn post(base: &str, path: &str, token: &str, key: &str, body: &serde_json::Value) -> Reply {
    let response = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .bearer_auth(token)
        .header("Idempotency-Key", key)
        .json(body)
        .send()
        .await
        .unwrap();
    let headers = response.headers().clone();
    Reply {
        status: response.status(),
        replayed: headers
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true"),
        headers,
        body: response.bytes().await.unwrap().to_vec(),
    }
}

/// 100 concurrent duplicates spread over `bases`; returns (fresh 201s, replayed
/// 201s, 409s) and checks nothing else came back.
async fn rush(
    bases: &[String],
    path: &str,
    token: &str,
    key: &str,
    body: serde_json::Value,
) -> (usize, usize, usize) {
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let (base, path, token, key, body) = (
                bases[i % bases.len()].clone(),
                path.to_owned(),
                token.to_owned(),
                key.to_owned(),
                body.clone(),
            );
            tokio::spawn(async move { post(&base, &path, &token, &key, &body).await })
        })
        .collect();
    let (mut fresh, mut replays, mut conflicts) = (0, 0, 0);
    for task in tasks {
        let reply = task.await.unwrap();
        match (reply.status, reply.replayed) {
            (StatusCode::CREATED, false) => fresh += 1,
            (StatusCode::CREATED, true) => replays += 1,
            (StatusCode::CONFLICT, false) => {
                assert!(reply.headers.contains_key("retry-after"));
                conflicts += 1
            }
            other => panic!(
                "unexpected answer {other:?}: {}",
                String::from_utf8_lossy(&reply.body)
            ),
        }
    }
    (fresh, replays, conflicts)
}

/// 100 duplicate orders and then 100 duplicate payments: one order, one charge,
/// and a retry afterwards replays the one response.
async fn one_order_one_charge(db: &str, key_store: Option<&str>) {
    let (running, service) = start(db, key_store).await;
    let (user, product) = user_and_product();
    service.restock(&product, 500).await.unwrap();
    let base = [running.url()];
    let token = format!("user-{user}");
    let order_key = format!("order-{user}");
    let order = json!({ "user_id": user, "product_id": product, "quantity": 1 });
    let (fresh, replays, conflicts) =
        rush(&base, "/orders", &token, &order_key, order.clone()).await;
    assert_eq!(
        fresh, 1,
        "one request ran ({replays} replays, {conflicts} conflicts)"
    );
    assert_eq!(service.orders_of(&[&user]).await.unwrap(), 1);
    let retry = post(&base[0], "/orders", &token, &order_key, &order).await;
    assert_eq!((retry.status, retry.replayed), (StatusCode::CREATED, true));
    let order_id = serde_json::from_slice::<serde_json::Value>(&retry.body).unwrap()["id"]
        .as_i64()
        .unwrap();

    let payment = json!({ "order_id": order_id, "amount_cents": 1999, "card": CARD_OK });
    let pay_key = format!("pay-{user}");
    let (fresh, _, _) = rush(&base, "/payments", &token, &pay_key, payment.clone()).await;
    assert_eq!(fresh, 1);
    assert_eq!(service.charges_of(&[&user]).await.unwrap(), 1);
    let retry = post(&base[0], "/payments", &token, &pay_key, &payment).await;
    assert_eq!((retry.status, retry.replayed), (StatusCode::CREATED, true));
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_make_one_order_and_one_charge_on_sqlite() {
    one_order_one_charge(&sqlite_file("dups"), None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_make_one_order_and_one_charge_with_a_memory_key_store() {
    one_order_one_charge(&sqlite_file("mem"), Some("memory")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_make_one_order_and_one_charge_on_postgres() {
    one_order_one_charge(&postgres_url(), None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_make_one_order_and_one_charge_with_a_redis_key_store() {
    one_order_one_charge(&sqlite_file("redis"), Some(&redis_url())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_is_byte_for_byte_and_never_crosses_users() {
    let (running, service) = start(&sqlite_file("scope"), None).await;
    let (ann, product) = user_and_product();
    let bob = format!("bob-{}", fresh_id());
    service.restock(&product, 10).await.unwrap();
    let base = running.url();
    let key = "same-key-for-both";
    let ann_order = json!({ "user_id": ann, "product_id": product, "quantity": 1 });
    let bob_order = json!({ "user_id": bob, "product_id": product, "quantity": 1 });
    let first = post(&base, "/orders", "ann", key, &ann_order).await;
    let bobs = post(&base, "/orders", "bob", key, &bob_order).await;
    assert_eq!((bobs.status, bobs.replayed), (StatusCode::CREATED, false));
    assert_ne!(bobs.body, first.body, "bob got his own order");
    let again = post(&base, "/orders", "ann", key, &ann_order).await;
    assert!(again.replayed);
    assert_eq!(again.body, first.body);
    for name in ["content-type", "content-length"] {
        assert_eq!(again.headers.get(name), first.headers.get(name), "{name}");
    }
    // Bob reusing his key with ann's body is a different request: 422.
    let crossed = post(&base, "/orders", "bob", key, &ann_order).await;
    assert_eq!(crossed.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(service.orders_of(&[&ann, &bob]).await.unwrap(), 2);
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_survive_a_server_restart_on_the_same_sqlite_file() {
    let db = sqlite_file("restart");
    let (user, product) = user_and_product();
    let order = json!({ "user_id": user, "product_id": product, "quantity": 1 });
    let payment_key = format!("pay-{user}");
    let (first_order, first_payment) = {
        let (running, service) = start(&db, None).await;
        service.restock(&product, 10).await.unwrap();
        let o = post(&running.url(), "/orders", "ann", "restart-order", &order).await;
        assert_eq!(o.status, StatusCode::CREATED);
        let id = serde_json::from_slice::<serde_json::Value>(&o.body).unwrap()["id"].clone();
        let payment = json!({ "order_id": id, "amount_cents": 1999, "card": CARD_OK });
        let p = post(&running.url(), "/payments", "ann", &payment_key, &payment).await;
        assert_eq!(p.status, StatusCode::CREATED);
        running.stop().await.unwrap();
        (o, (p, payment))
    };
    // A new process would open the file the same way: a new pool, a new server.
    let (running, service) = start(&db, None).await;
    let o = post(&running.url(), "/orders", "ann", "restart-order", &order).await;
    assert!(o.replayed);
    assert_eq!(o.body, first_order.body);
    let p = post(
        &running.url(),
        "/payments",
        "ann",
        &payment_key,
        &first_payment.1,
    )
    .await;
    assert!(p.replayed);
    assert_eq!(p.body, first_payment.0.body);
    assert_eq!(service.orders_of(&[&user]).await.unwrap(), 1);
    assert_eq!(service.charges_of(&[&user]).await.unwrap(), 1);
    running.stop().await.unwrap();
}

/// A server in its own OS process: `order-service serve`.
struct Process(std::process::Child, String);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn spawn_server(db: &str, key_store: &str) -> Process {
    let addr = format!("127.0.0.1:{}", free_port());
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_order-service"))
        .args([
            "serve",
            "--addr",
            &addr,
            "--db",
            db,
            "--key-store",
            key_store,
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let process = Process(child, format!("http://{addr}"));
    let health = format!("{}/healthz", process.1);
    for _ in 0..300 {
        if let Ok(r) = reqwest::get(&health).await {
            if r.status() == StatusCode::OK {
                return process;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("order-service serve did not come up on {addr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_server_processes_on_one_database_make_one_order() {
    for key_store in [postgres_url(), redis_url()] {
        let db = postgres_url();
        let servers = [
            spawn_server(&db, &key_store).await,
            spawn_server(&db, &key_store).await,
            spawn_server(&db, &key_store).await,
        ];
        let service = OrderService::new(Db::open(&db).await.unwrap());
        let (user, product) = user_and_product();
        service.restock(&product, 500).await.unwrap();
        let bases: Vec<String> = servers.iter().map(|p| p.1.clone()).collect();
        let order = json!({ "user_id": user, "product_id": product, "quantity": 1 });
        let key = format!("multi-{user}");
        let (fresh, _, _) = rush(&bases, "/orders", "ann", &key, order.clone()).await;
        assert_eq!(fresh, 1, "key store {key_store}");
        assert_eq!(service.orders_of(&[&user]).await.unwrap(), 1);
        for base in &bases {
            let retry = post(base, "/orders", "ann", &key, &order).await;
            assert_eq!((retry.status, retry.replayed), (StatusCode::CREATED, true));
        }
    }
}

/// The IETF draft sends the key as a Structured Field string (`"k"`), Stripe's
/// clients send it bare (`k`): a retry that switches spelling is a replay, not
/// a second order; a malformed quoted key is a 400 (issue 11, item 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quoted_and_the_bare_key_are_one_order() {
    let (running, service) = start(&sqlite_file("spelling"), None).await;
    let (user, product) = user_and_product();
    service.restock(&product, 10).await.unwrap();
    let base = running.url();
    let order = json!({ "user_id": user, "product_id": product, "quantity": 1 });
    let key = "8e03978e-40d5-43e8-bc93-6894a57f9324";
    let first = post(&base, "/orders", "ann", key, &order).await;
    assert_eq!((first.status, first.replayed), (StatusCode::CREATED, false));
    let quoted = post(&base, "/orders", "ann", &format!("\"{key}\""), &order).await;
    assert_eq!(
        (quoted.status, quoted.replayed),
        (StatusCode::CREATED, true)
    );
    assert_eq!(quoted.body, first.body);
    // And the other way round, with a fresh key.
    let other = json!({ "user_id": user, "product_id": product, "quantity": 2 });
    let first = post(&base, "/orders", "ann", "\"k-2\"", &other).await;
    let bare = post(&base, "/orders", "ann", "k-2", &other).await;
    assert_eq!((first.replayed, bare.replayed), (false, true));
    assert_eq!(bare.body, first.body);
    for malformed in ["\"k-3", "\"k-3\";a=1", "\"k\\-3\"", "\"k 3\""] {
        let reply = post(&base, "/orders", "ann", malformed, &order).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{malformed}");
    }
    assert_eq!(service.orders_of(&[&user]).await.unwrap(), 2);
    running.stop().await.unwrap();
}

/// A request with no token is refused before anything runs, never put in a
/// scope anonymous clients share; a refreshed token of the same user keeps the
/// scope, so its retry replays (issue 11, item 2).
#[tokio::test]
async fn no_token_is_401_and_a_refreshed_token_keeps_its_scope() {
    let (running, service) = start(&sqlite_file("scope"), None).await;
    let (user, product) = user_and_product();
    service.restock(&product, 10).await.unwrap();
    let base = running.url();
    let order = json!({ "user_id": user, "product_id": product, "quantity": 1 });
    for _ in 0..2 {
        let anonymous = reqwest::Client::new()
            .post(format!("{base}/orders"))
            .header("Idempotency-Key", "anon-1")
            .json(&order)
            .send()
            .await
            .unwrap();
        assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
        let body: serde_json::Value = anonymous.json().await.unwrap();
        assert_eq!(body["type"], "urn:idem:problem:scope-unknown");
    }
    assert_eq!(service.orders_of(&[&user]).await.unwrap(), 0);
    let first = post(&base, "/orders", "ann.token-1", "refresh-1", &order).await;
    let refreshed = post(&base, "/orders", "ann.token-2", "refresh-1", &order).await;
    assert_eq!((first.status, first.replayed), (StatusCode::CREATED, false));
    assert!(
        refreshed.replayed,
        "the same user, a new token: the same scope"
    );
    assert_eq!(refreshed.body, first.body);
    let bob = post(&base, "/orders", "bob", "refresh-1", &order).await;
    assert!(!bob.replayed, "another user never gets ann's response");
    running.stop().await.unwrap();
}
