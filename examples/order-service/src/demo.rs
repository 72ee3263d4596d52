//! The self-driving demo: the server starts in this process on a free port, and
//! a real HTTP client drives every case a user meets through it.

use std::collections::BTreeMap;
use std::sync::Arc;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::payments::{CARD_DECLINED, CARD_OK, CARD_PROCESSING_ERROR};
use crate::server::{self, Running};
use crate::{Db, OrderError, OrderService};
use idem_runtime::Store as _;

mod report;
pub use report::{Report, Row};

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The database or the key store could not be opened.
    #[error(transparent)]
    Order(#[from] OrderError),
    /// The key store could not be opened.
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
    /// The database failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The server could not start.
    #[error("server error: {0}")]
    Io(#[from] std::io::Error),
    /// A request could not be sent.
    #[error("http error: {0}")]
    Http(#[from] reqwest::Error),
}

/// What one request got.
struct Reply {
    status: StatusCode,
    replayed: bool,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// One request the demo sends.
#[derive(Clone)]
struct Req {
    method: reqwest::Method,
    path: String,
    /// The `Authorization` header.
    authorization: Option<String>,
    key: Option<String>,
    body: Option<Vec<u8>>,
    /// The demo's injected failure: the step after which a checkout stops.
    crash_after: Option<String>,
}

impl Req {
    fn get(path: impl Into<String>) -> Self {
        Req {
            method: reqwest::Method::GET,
            path: path.into(),
            authorization: None,
            key: None,
            body: None,
            crash_after: None,
        }
    }

    fn post(path: &str, body: Vec<u8>) -> Self {
        Req {
            method: reqwest::Method::POST,
            body: Some(body),
            ..Req::get(path)
        }
    }

    fn by(self, token: &str) -> Self {
        self.authorization(&format!("Bearer {token}"))
    }

    fn authorization(mut self, value: &str) -> Self {
        self.authorization = Some(value.to_owned());
        self
    }

    fn key(mut self, key: &str) -> Self {
        self.key = Some(key.to_owned());
        self
    }

    fn crash_after(mut self, step: &str) -> Self {
        self.crash_after = Some(step.to_owned());
        self
    }
}

struct Driver {
    http: reqwest::Client,
    base: String,
    service: Arc<OrderService>,
    users: [String; 2],
    run: u64,
    report: Report,
}

impl Driver {
    /// Runs `idem ARGS` on the demo's database; `Ok(output)` if it exited 0
    /// and printed `expect`, `Err(output)` otherwise.
    async fn operate(&self, args: &[&str], expect: &str) -> Result<String, String> {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let argv = std::iter::once("idem").chain(args.iter().copied());
        let exit = idem_cli::run_on(self.service.db().admin(), argv, &mut out, &mut err).await;
        let mut text = String::from_utf8_lossy(&out).into_owned();
        text.push_str(&String::from_utf8_lossy(&err));
        if exit == idem_cli::Exit::Ok && text.contains(expect) {
            Ok(text)
        } else {
            Err(format!("exit {}: {text}", exit.code()))
        }
    }

    /// A row for one `idem` command, its output printed under the table.
    async fn operated(
        &mut self,
        args: &[&str],
        ran: Result<String, String>,
    ) -> Result<(), DemoError> {
        let quoted: Vec<String> = args
            .iter()
            .map(|a| {
                if a.contains(['"', ' ', '[']) {
                    format!("'{a}'")
                } else {
                    a.to_string()
                }
            })
            .collect();
        let command = format!("idem {}", quoted.join(" "));
        let label = format!(
            "{} (the CLI)",
            command.split(" '").next().unwrap_or(&command)
        );
        let (status, ok, output) = match ran {
            Ok(output) => ("exit 0".to_owned(), true, output),
            Err(output) => ("failed".to_owned(), false, output),
        };
        self.row(&label, status, "-".into(), (5, 2), ok).await?;
        self.report.operated.push((
            format!("$ idem --store {} {}", self.report.url, quoted.join(" ")),
            output,
        ));
        Ok(())
    }

    /// `GET /metrics`, as text.
    async fn scrape(&self) -> Result<String, DemoError> {
        let url = format!("{}/metrics", self.base);
        Ok(self.http.get(url).send().await?.text().await?)
    }

    async fn send(&self, req: &Req) -> Result<Reply, DemoError> {
        let mut request = self
            .http
            .request(req.method.clone(), format!("{}{}", self.base, req.path));
        if let Some(value) = &req.authorization {
            request = request.header("Authorization", value);
        }
        if let Some(key) = &req.key {
            request = request.header("Idempotency-Key", key);
        }
        if let Some(step) = &req.crash_after {
            request = request.header(server::CRASH_AFTER, step);
        }
        if let Some(body) = &req.body {
            request = request
                .header("content-type", "application/json")
                .body(body.clone());
        }
        let response = request.send().await?;
        let status = response.status();
        let replayed = response
            .headers()
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true");
        let body = response.bytes().await?.to_vec();
        Ok(Reply {
            status,
            replayed,
            body,
        })
    }

    /// Sends `req`, and adds a row checking that it got `expect` (status,
    /// replayed?) and left `counts` (orders, charges) in the database.
    async fn expect(
        &mut self,
        label: &str,
        req: &Req,
        expect: (StatusCode, bool),
        counts: (i64, i64),
    ) -> Result<Reply, DemoError> {
        let reply = self.send(req).await?;
        self.one(label, &reply, expect, counts).await?;
        Ok(reply)
    }

    /// A key unique to this run, so the demo can run again on the same database.
    fn key(&self, name: &str) -> String {
        format!("demo-{}-{name}", self.run)
    }

    async fn row(
        &mut self,
        request: &str,
        status: String,
        replayed: String,
        expected: (i64, i64),
        as_expected: bool,
    ) -> Result<(), DemoError> {
        let users = [self.users[0].as_str(), self.users[1].as_str()];
        let orders = self.service.orders_of(&users).await?;
        let charges = self.service.charges_of(&users).await?;
        self.report.rows.push(Row {
            request: request.into(),
            status,
            replayed,
            orders,
            charges,
            as_expected: as_expected && (orders, charges) == expected,
        });
        Ok(())
    }

    async fn one(
        &mut self,
        label: &str,
        reply: &Reply,
        expect: (StatusCode, bool),
        counts: (i64, i64),
    ) -> Result<(), DemoError> {
        let ok = (reply.status, reply.replayed) == expect;
        let status = reply.status.as_u16().to_string();
        let replayed = if reply.replayed { "yes" } else { "no" }.to_string();
        self.row(label, status, replayed, counts, ok).await
    }
}

fn order_body(user_id: &str, product_id: &str, quantity: u32) -> Vec<u8> {
    serde_json::to_vec(
        &json!({ "user_id": user_id, "product_id": product_id, "quantity": quantity }),
    )
    .unwrap_or_default()
}

/// Starts the server on a free port over the database at `url` (records in the
/// same database) and drives every case through it. Each run uses its own
/// users, products and keys, so the demo can run again on the same file.
pub async fn run(url: &str) -> Result<Report, DemoError> {
    let service = OrderService::new(Db::open(url).await?);
    let keys = server::key_store(None, service.db()).await?;
    let running = server::start("127.0.0.1:0", service.clone(), keys).await?;
    let result = drive(url, Arc::new(service), &running).await;
    running.stop().await?;
    result
}

async fn drive(
    url: &str,
    service: Arc<OrderService>,
    running: &Running,
) -> Result<Report, DemoError> {
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    // The users are the tokens' subjects; the products this run's own SKUs.
    let (ann, bob) = (format!("ann-{run}"), format!("bob-{run}"));
    let (widget, gadget) = (format!("SKU-W-{run}"), format!("SKU-G-{run}"));
    let (ann, bob, widget, gadget) = (ann.as_str(), bob.as_str(), widget.as_str(), gadget.as_str());
    service.restock(widget, 100).await?;
    service.restock(gadget, 0).await?;
    let mut d = Driver {
        http: reqwest::Client::new(),
        base: running.url(),
        service: Arc::clone(&service),
        users: [ann.to_owned(), bob.to_owned()],
        run,
        report: Report {
            backend: service.backend(),
            url: url.to_owned(),
            server: running.url(),
            rows: Vec::new(),
            notes: Vec::new(),
            metrics: Default::default(),
            operated: Vec::new(),
        },
    };
    // The metrics are process-wide: this run's are the difference between a
    // scrape now and one at the end, on this run's kind of store.
    let before = d.scrape().await?;
    let (ann_t, bob_t) = (ann.to_owned(), bob.to_owned());
    let created = (StatusCode::CREATED, false);
    let replayed = (StatusCode::CREATED, true);
    let order = |user: &str, product: &str, quantity| {
        Req::post("/orders", order_body(user, product, quantity))
    };

    // Orders.
    let k1 = d.key("order-1");
    let first_order = order(ann, widget, 1).by(&ann_t).key(&k1);
    let first = d
        .expect("POST /orders (key order-1)", &first_order, created, (1, 0))
        .await?;
    let order_id = first.json()["id"].as_i64().unwrap_or(0);
    let retry = d
        .expect(
            "same request again: a client retry",
            &first_order,
            replayed,
            (1, 0),
        )
        .await?;
    if retry.body != first.body {
        if let Some(row) = d.report.rows.last_mut() {
            row.as_expected = false; // a replay is byte for byte
        }
    }

    let rush = order(ann, widget, 2).by(&ann_t).key(&d.key("order-2"));
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (client, base, req) = (d.http.clone(), d.base.clone(), rush.clone());
            tokio::spawn(async move {
                let r = client
                    .post(format!("{base}{}", req.path))
                    .header("Authorization", req.authorization.unwrap_or_default())
                    .header("Idempotency-Key", req.key.unwrap_or_default())
                    .header("content-type", "application/json")
                    .body(req.body.unwrap_or_default())
                    .send()
                    .await?;
                let replayed = r.headers().get("idempotent-replayed").is_some();
                Ok::<_, reqwest::Error>((r.status(), replayed))
            })
        })
        .collect();
    let (mut fresh, mut replays, mut conflicts, mut other) = (0, 0, 0, 0);
    for task in tasks {
        match task.await.map_err(std::io::Error::other)? {
            Ok((StatusCode::CREATED, false)) => fresh += 1,
            Ok((StatusCode::CREATED, true)) => replays += 1,
            Ok((StatusCode::CONFLICT, _)) => conflicts += 1,
            _ => other += 1,
        }
    }
    let mut status = format!("201 ×{}", fresh + replays);
    if conflicts > 0 {
        status += &format!(", 409 ×{conflicts}");
    }
    if other > 0 {
        status += &format!(", other ×{other}");
    }
    let label = "20 concurrent duplicates (key order-2)";
    let ok = fresh == 1 && other == 0;
    d.row(label, status, format!("{replays} of 20"), (2, 0), ok)
        .await?;
    d.expect("order-2 retried after the rush", &rush, replayed, (2, 0))
        .await?;

    let bad_request = (StatusCode::BAD_REQUEST, false);
    let changed = order(ann, widget, 5).by(&ann_t).key(&k1);
    let reused = (StatusCode::UNPROCESSABLE_ENTITY, false);
    d.expect(
        "key order-1 with a different body",
        &changed,
        reused,
        (2, 0),
    )
    .await?;
    let no_key = order(ann, widget, 1).by(&ann_t);
    d.expect(
        "POST /orders without Idempotency-Key",
        &no_key,
        bad_request,
        (2, 0),
    )
    .await?;
    let bad_key = order(ann, widget, 1).by(&ann_t).key("not a key");
    d.expect(
        "POST /orders with a malformed key",
        &bad_key,
        bad_request,
        (2, 0),
    )
    .await?;
    let bobs = order(bob, widget, 1).by(&bob_t).key(&k1);
    d.expect("key order-1 sent by another user", &bobs, created, (3, 0))
        .await?;

    let sold_out = order(bob, gadget, 1).by(&bob_t).key(&d.key("order-3"));
    let conflict = (StatusCode::CONFLICT, false);
    d.expect(
        "POST /orders, product out of stock",
        &sold_out,
        conflict,
        (3, 0),
    )
    .await?;
    service.restock(gadget, 10).await?;
    d.expect(
        "same key after a restock: runs again",
        &sold_out,
        created,
        (4, 0),
    )
    .await?;

    let unknown = order(bob, &format!("SKU-NONE-{run}"), 1)
        .by(&bob_t)
        .key(&d.key("order-4"));
    d.expect(
        "POST /orders, unknown product",
        &unknown,
        (StatusCode::NOT_FOUND, false),
        (4, 0),
    )
    .await?;
    let zero = order(bob, widget, 0).by(&bob_t).key(&d.key("order-5"));
    d.expect(
        "POST /orders, quantity 0",
        &zero,
        (StatusCode::UNPROCESSABLE_ENTITY, false),
        (4, 0),
    )
    .await?;

    let found = Req::get(format!("/orders/{order_id}")).by(&ann_t);
    d.expect("GET /orders/{id}", &found, (StatusCode::OK, false), (4, 0))
        .await?;
    let absent = Req::get("/orders/0").by(&ann_t);
    d.expect(
        "GET /orders/0",
        &absent,
        (StatusCode::NOT_FOUND, false),
        (4, 0),
    )
    .await?;

    // Payments.
    let pay = |card: &str, key: &str| {
        let body = json!({ "order_id": order_id, "amount_cents": 1999, "card": card });
        Req::post("/payments", serde_json::to_vec(&body).unwrap_or_default())
            .by(&ann_t)
            .key(key)
    };
    let charge = pay(CARD_OK, &d.key("pay-1"));
    d.expect(
        "POST /payments, card 4242… (succeeds)",
        &charge,
        created,
        (4, 1),
    )
    .await?;
    d.expect("the same payment retried", &charge, replayed, (4, 1))
        .await?;
    let lowercase = charge.clone().authorization(&format!("bearer {ann_t}"));
    d.expect(
        "retried with `bearer` in lower case",
        &lowercase,
        replayed,
        (4, 1),
    )
    .await?;
    let declined = pay(CARD_DECLINED, &d.key("pay-2"));
    let payment_required = StatusCode::PAYMENT_REQUIRED;
    d.expect(
        "card 4000…0002 (declined)",
        &declined,
        (payment_required, false),
        (4, 1),
    )
    .await?;
    d.expect(
        "the declined payment retried",
        &declined,
        (payment_required, true),
        (4, 1),
    )
    .await?;
    let failing = pay(CARD_PROCESSING_ERROR, &d.key("pay-3"));
    let server_error = (StatusCode::INTERNAL_SERVER_ERROR, false);
    d.expect(
        "card 4000…0119 (processing error)",
        &failing,
        server_error,
        (4, 1),
    )
    .await?;
    d.expect(
        "retried: the key was released, runs again",
        &failing,
        server_error,
        (4, 1),
    )
    .await?;

    // Checkout: four steps (reserve the stock, charge, ship, email). The first
    // attempt stops right after the charge (a failure the demo injects); the
    // client's retry resumes at the shipment.
    let body = json!({
        "user_id": ann, "product_id": widget, "quantity": 3,
        "ship_to": "1 Demo Street", "card": CARD_OK,
    });
    let checkout = Req::post("/checkout", serde_json::to_vec(&body).unwrap_or_default())
        .by(&ann_t)
        .key(&d.key("checkout-1"));
    let unavailable = (StatusCode::SERVICE_UNAVAILABLE, false);
    d.expect(
        "POST /checkout, stopped after the charge",
        &checkout.clone().crash_after("charge"),
        unavailable,
        (5, 2),
    )
    .await?;
    let resumed = d
        .expect(
            "retried: resumes at the shipment",
            &checkout,
            created,
            (5, 2),
        )
        .await?;
    let checkout_order = resumed.json()["order"]["id"].as_i64().unwrap_or(0);
    let effects = service.effects_of(checkout_order).await?;
    if effects != (1, 1, 1) {
        if let Some(row) = d.report.rows.last_mut() {
            row.as_expected = false;
        }
    }
    d.expect("the checkout retried again", &checkout, replayed, (5, 2))
        .await?;
    d.report.notes.push(format!(
        "checkout (order {checkout_order}): {} charge, {} shipment, {} email — the retry replayed \
         the reserve and the charge, and ran the shipment and the email",
        effects.0, effects.1, effects.2
    ));

    let huge = Req::post("/orders", vec![b' '; 2 << 20])
        .by(&ann_t)
        .key(&d.key("huge"));
    let too_large = (StatusCode::PAYLOAD_TOO_LARGE, false);
    d.expect("POST /orders with a 2 MiB body", &huge, too_large, (5, 2))
        .await?;
    d.expect(
        "GET /healthz",
        &Req::get("/healthz"),
        (StatusCode::OK, false),
        (5, 2),
    )
    .await?;

    let after = d.scrape().await?;
    d.expect(
        "GET /metrics (Prometheus text)",
        &Req::get("/metrics"),
        (StatusCode::OK, false),
        (5, 2),
    )
    .await?;
    d.report.metrics = outcome_deltas(&before, &after, service.db().store().kind());
    // Every claim this run won ended: recorded, or released.
    let n = |outcome: &str| d.report.metrics.get(outcome).copied().unwrap_or(0);
    let won = n("claimed") + n("taken_over");
    let ended = n("completed") + n("released_after_error") + n("cancelled");
    if won == 0 || won != ended {
        if let Some(row) = d.report.rows.last_mut() {
            row.as_expected = false;
        }
    }
    let line = d
        .report
        .metrics
        .iter()
        .map(|(outcome, n)| format!("{outcome} {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    d.report.notes.push(format!(
        "idem_outcomes_total for this run (GET /metrics): {line}"
    ));

    // The operator's view of the same database: the `idem` CLI, in process.
    let first_key = serde_json::to_string(&json!([ann, widget, 1])).unwrap_or_default();
    let inspect = [
        "inspect",
        "order-service::create_order",
        first_key.as_str(),
        "--window",
        "1d",
    ];
    let inspected = d.operate(&inspect, "completed").await;
    let stats = d.operate(&["stats"], "order-service::create_order").await;
    d.operated(&inspect, inspected).await?;
    d.operated(&["stats"], stats).await?;

    Ok(d.report)
}

/// This run's counts by outcome: `after - before`, over every namespace, on
/// stores of kind `store`.
fn outcome_deltas(before: &str, after: &str, store: &str) -> BTreeMap<String, u64> {
    let total = |text: &str| {
        let mut by = BTreeMap::<String, f64>::new();
        for s in crate::metrics::outcomes(text)
            .into_iter()
            .filter(|s| s.store == store)
        {
            *by.entry(s.outcome).or_default() += s.value;
        }
        by
    };
    let before = total(before);
    total(after)
        .into_iter()
        .map(|(outcome, n)| {
            let was = before.get(&outcome).copied().unwrap_or(0.0);
            (outcome, (n - was).max(0.0) as u64)
        })
        .filter(|(_, n)| *n > 0)
        .collect()
}
