//! The demo's promises hold on both databases, over real HTTP: one order per
//! distinct request, one charge per payment, a checkout stopped after its
//! charge that resumes at the shipment (one charge, one shipment, one email),
//! replays for the rest, and it can run again on the same database.

async fn check(url: &str) {
    for _ in 0..2 {
        let report = order_service::demo::run(url).await.unwrap();
        assert!(report.all_passed(), "{report}");
        assert_eq!(report.rows.len(), 29);
        let last = report.rows.last().unwrap();
        assert_eq!((last.orders, last.charges), (5, 2));
        let checkout = &report.notes[0];
        assert!(
            checkout.contains("1 charge, 1 shipment, 1 email"),
            "{checkout}"
        );
        // Scraped from GET /metrics: this run's decisions, on this database.
        let n = |outcome: &str| report.metrics.get(outcome).copied().unwrap_or(0);
        let m = &report.metrics;
        // The layer's claims and `create_order`'s own (its business key): 19
        // fresh ones and the retried checkout's takeover, each of them ended.
        assert_eq!(n("claimed"), 19, "{m:?}");
        assert_eq!(n("taken_over"), 1, "{m:?}");
        assert_eq!(n("key_reused"), 1, "{m:?}");
        assert_eq!(n("completed") + n("released_after_error"), 20, "{m:?}");
        // 19 duplicates in the rush, refused or (if the first had finished) replayed,
        // and 6 retries replayed.
        assert_eq!(n("in_progress") + n("replayed"), 25, "{m:?}");
        assert_eq!(
            n("lease_lost") + n("store_error") + n("cancelled"),
            0,
            "{m:?}"
        );
        assert!(
            report.notes[1].starts_with("idem_outcomes_total"),
            "{:?}",
            report.notes
        );
        // The idem CLI on the same database: the first order's record, found by
        // the macro's key derivation, and the counts by namespace.
        let [(inspect, inspected), (stats, counted)] = &report.operated[..] else {
            panic!("{:?}", report.operated);
        };
        assert!(
            inspect.contains("inspect order-service::create_order"),
            "{inspect}"
        );
        assert!(inspected.contains("status       completed"), "{inspected}");
        assert!(stats.ends_with(" stats"), "{stats}");
        assert!(counted.contains("order-service::create_order"), "{counted}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_on_an_sqlite_file() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    check(&format!("sqlite://{}/orders.db", dir.display())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_on_postgres() {
    let url = std::env::var("IDEM_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    check(&url).await;
}
