//! The consumer example against the local JetStream server and the local
//! Kafka broker: every payment is recorded once, republished events are
//! skipped, the failed delivery is redelivered and recorded; twice in a row on
//! the same database.

/// Runs the demo twice on `broker` over a fresh SQLite file, and checks each report.
async fn twice(broker: &str, name: &str) {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let db = format!("sqlite://{}/orders.db", dir.display());
    for _ in 0..2 {
        let report = consumer::demo_on(broker, &db).await.unwrap();
        assert!(report.all_once(), "{report}");
        assert_eq!(report.recorded.len(), 8);
        let count = |prefix: &str| {
            report
                .lines
                .iter()
                .filter(|l| l.outcome.starts_with(prefix))
                .count()
        };
        assert_eq!(count("processed"), 8, "{report}");
        assert_eq!(count("skipped"), 3, "{report}");
        assert!(count("failed") >= 1, "{report}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_records_every_payment_exactly_once() {
    let nats = std::env::var("IDEM_NATS_URL").unwrap_or_else(|_| "127.0.0.1:4222".into());
    twice(&nats, "consumer").await;
}

/// The same on Kafka (the broker `scripts/test.sh` starts on 127.0.0.1:9092):
/// `cargo run -p consumer -- --broker kafka://127.0.0.1:9092`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_records_every_payment_exactly_once_on_kafka() {
    let kafka = std::env::var("IDEM_KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9092".into());
    twice(&format!("kafka://{kafka}"), "consumer-kafka").await;
}
