//! The demo's promises hold: one order per distinct request, replays for the rest.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_creates_one_order_per_distinct_request() {
    let report = order_service::demo::run().await;
    assert!(report.all_passed(), "{report}");
    assert_eq!(report.rows.len(), 7);
    assert_eq!(report.rows.last().unwrap().orders, 3);
}
