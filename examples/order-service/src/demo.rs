//! The self-driving demo: one process, one service, every case a user meets.

use std::fmt;
use std::sync::Arc;

use crate::{CreateOrderRequest, Db, Order, OrderError, OrderService};

/// One line of the demo's table.
#[derive(Debug, Clone)]
pub struct Row {
    /// What the client did.
    pub call: String,
    /// What it got back.
    pub outcome: String,
    /// Orders (of this run's users) that exist after the call.
    pub orders: i64,
    /// Orders that should exist after the call.
    pub expected_orders: i64,
    /// Whether the outcome was the one idem promises.
    pub as_expected: bool,
}

/// Everything the demo did, printable as a table.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The database the demo ran on.
    pub backend: &'static str,
    /// Its URL.
    pub url: String,
    /// The calls, in order.
    pub rows: Vec<Row>,
}

impl Report {
    /// Whether every call behaved as promised.
    pub fn all_passed(&self) -> bool {
        self.rows
            .iter()
            .all(|r| r.as_expected && r.orders == r.expected_orders)
    }
}

fn request(user_id: u64, product_id: u64, quantity: u32, ship_to: &str) -> CreateOrderRequest {
    CreateOrderRequest {
        user_id,
        product_id,
        quantity,
        ship_to: ship_to.into(),
    }
}

fn describe(result: &Result<Order, OrderError>) -> String {
    match result {
        Ok(order) => format!("Ok: order #{}", order.id),
        Err(OrderError::Idempotency(idem_runtime::Error::KeyReused)) => {
            "Err: key reused with a different request".into()
        }
        Err(e) => format!("Err: {e}"),
    }
}

/// Runs the demo against the database at `url`. Each run uses its own users
/// and products, so the demo can run again and again on the same file.
pub async fn run(url: &str) -> Result<Report, OrderError> {
    let service = Arc::new(OrderService::new(Db::open(url).await?));
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let (ann, bob) = (run * 10 + 7, run * 10 + 8);
    let (widget, gadget) = (run * 100 + 42, run * 100 + 99);
    let users = [ann, bob];
    service.restock(widget, 100).await?;
    service.restock(gadget, 0).await?;
    let mut report = Report {
        backend: service.backend(),
        url: url.to_owned(),
        rows: Vec::new(),
    };
    let mut row = async |call: &str, outcome: String, expected_orders: i64, as_expected: bool| {
        let orders = service.orders_of(&users).await?;
        report.rows.push(Row {
            call: call.into(),
            outcome,
            orders,
            expected_orders,
            as_expected,
        });
        Ok::<_, OrderError>(())
    };

    // 1. Fifty clients send the same order at the same moment.
    let order_a = request(ann, widget, 1, "1 Main St");
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let service = service.clone();
            let req = order_a.clone();
            tokio::spawn(async move { service.create_order(req).await })
        })
        .collect();
    let mut ids = Vec::new();
    let mut failures = Vec::new();
    for task in tasks {
        match task.await {
            Ok(Ok(order)) => ids.push(order.id),
            Ok(Err(e)) => failures.push(e.to_string()),
            Err(e) => failures.push(e.to_string()),
        }
    }
    ids.sort_unstable();
    ids.dedup();
    let first = ids.first().copied().unwrap_or(0);
    let all_same = failures.is_empty() && ids.len() == 1;
    row(
        "50 concurrent duplicates of order A",
        if all_same {
            format!("50 × Ok: order #{first}, the same order for every caller")
        } else {
            format!("{} distinct orders, failures: {failures:?}", ids.len())
        },
        1,
        all_same,
    )
    .await?;

    // 2. A client that timed out retries.
    let retry = service.create_order(order_a.clone()).await;
    let replayed = matches!(&retry, Ok(o) if o.id == first);
    row(
        "retry of order A after a timeout",
        describe(&retry) + " (replayed)",
        1,
        replayed,
    )
    .await?;

    // 3. A different quantity is a different order.
    let changed = service
        .create_order(request(ann, widget, 2, "1 Main St"))
        .await;
    let created = matches!(&changed, Ok(o) if o.id != first);
    row(
        "order A with quantity 2 instead of 1",
        describe(&changed) + " (new order)",
        2,
        created,
    )
    .await?;

    // 4. The same order shipped elsewhere: same key, different fingerprint.
    let reused = service
        .create_order(request(ann, widget, 1, "9 Elm St"))
        .await;
    let refused = matches!(
        reused,
        Err(OrderError::Idempotency(idem_runtime::Error::KeyReused))
    );
    row(
        "order A shipped to another address",
        describe(&reused),
        2,
        refused,
    )
    .await?;

    // 5. A failing call: the error releases the key, so a retry runs again.
    let order_b = request(bob, gadget, 1, "5 Oak Ave");
    let failed = service.create_order(order_b.clone()).await;
    let out_of_stock = matches!(failed, Err(OrderError::OutOfStock { .. }));
    row(
        "order B, product out of stock",
        describe(&failed),
        2,
        out_of_stock,
    )
    .await?;

    service.restock(gadget, 10).await?;
    let second_try = service.create_order(order_b.clone()).await;
    let ran_again = second_try.is_ok();
    row(
        "order B retried after a restock",
        describe(&second_try) + " (ran again)",
        3,
        ran_again,
    )
    .await?;

    let third_try = service.create_order(order_b).await;
    let same = matches!((&second_try, &third_try), (Ok(a), Ok(b)) if a == b);
    row(
        "order B retried once more",
        describe(&third_try) + " (replayed)",
        3,
        same,
    )
    .await?;

    Ok(report)
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let call_w = self
            .rows
            .iter()
            .map(|r| r.call.len())
            .max()
            .unwrap_or(4)
            .max(4);
        let out_w = self
            .rows
            .iter()
            .map(|r| r.outcome.len())
            .max()
            .unwrap_or(7)
            .max(7);
        writeln!(
            f,
            "idem order-service demo: orders and idempotency records in {} ({}), one transaction per order",
            self.backend, self.url
        )?;
        writeln!(f)?;
        writeln!(
            f,
            " # | {:call_w$} | {:out_w$} | orders | check",
            "call", "outcome"
        )?;
        writeln!(
            f,
            "---+-{}-+-{}-+--------+------",
            "-".repeat(call_w),
            "-".repeat(out_w)
        )?;
        for (i, r) in self.rows.iter().enumerate() {
            let check = if r.as_expected && r.orders == r.expected_orders {
                "ok"
            } else {
                "FAIL"
            };
            writeln!(
                f,
                "{:>2} | {:call_w$} | {:out_w$} | {:>6} | {check}",
                i + 1,
                r.call,
                r.outcome,
                r.orders
            )?;
        }
        writeln!(f)?;
        let created = self.rows.last().map_or(0, |r| r.orders);
        let expected = self.rows.last().map_or(0, |r| r.expected_orders);
        writeln!(
            f,
            "orders created: {created} (expected {expected}) — {}",
            if self.all_passed() {
                "every duplicate was answered without running twice"
            } else {
                "SOMETHING RAN TWICE OR FAILED"
            }
        )
    }
}
