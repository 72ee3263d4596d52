//! A self-driving demo of the payments service: serves it behind
//! `IdempotencyLayer` on a free local port, with its records in a SQLite file
//! (`--db sqlite://path.db`, default a new file in the temporary directory),
//! and drives a client through a retry, a reused key, a concurrent duplicate
//! and a missing key. Exits non-zero if any answer is not what it should be.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use grpc_example::{layer, serve, ChargeRequest, Ledger, PaymentsClient};
use idem_runtime::SqliteStore;
use tonic::{Code, Request};

fn call(key: Option<&str>, amount_cents: i64) -> Request<ChargeRequest> {
    let mut request = Request::new(ChargeRequest {
        account: "acct-42".into(),
        amount_cents,
        currency: "EUR".into(),
    });
    request.metadata_mut().insert(
        "authorization",
        tonic::metadata::MetadataValue::from_static("Bearer ann"),
    );
    if let Some(key) = key {
        if let Ok(key) = key.parse() {
            request.metadata_mut().insert("idempotency-key", key);
        }
    }
    request
}

fn check(ok: bool, what: &str) -> Result<(), String> {
    if ok {
        println!("  ok: {what}");
        Ok(())
    } else {
        Err(format!("unexpected: {what} does not hold"))
    }
}

async fn demo() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let db = std::env::args()
        .skip_while(|a| a != "--db")
        .nth(1)
        .unwrap_or_else(|| {
            let file = std::env::temp_dir().join(format!(
                "grpc-example-{}-{}.db",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis())
                    .unwrap_or_default()
            ));
            format!("sqlite://{}", file.display())
        });
    let store = SqliteStore::connect(&db).await?;
    let ledger = Ledger::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(serve(listener, layer(store), Arc::clone(&ledger)));
    println!("payments.v1.Payments on {addr}, idempotency records in {db}");
    let mut client = PaymentsClient::connect(format!("http://{addr}")).await?;
    let key = format!("charge-{}", std::process::id());

    println!("1. Charge 12.50 EUR with key {key}, then retry it:");
    let first = client.charge(call(Some(&key), 1250)).await?;
    let retry = client.charge(call(Some(&key), 1250)).await?;
    println!(
        "  first: {} (execution {}); retry: {}, idempotent-replayed: {:?}",
        first.get_ref().charge_id,
        first.get_ref().execution,
        retry.get_ref().charge_id,
        retry.metadata().get("idempotent-replayed"),
    );
    check(
        first.get_ref() == retry.get_ref(),
        "the retry got the same reply",
    )?;
    check(ledger.executions() == 1, "the card was charged once")?;

    println!("2. The same key with another amount:");
    let err = client
        .charge(call(Some(&key), 9999))
        .await
        .err()
        .ok_or("the reused key was accepted")?;
    println!("  {:?}: {}", err.code(), err.message());
    check(err.code() == Code::InvalidArgument, "INVALID_ARGUMENT")?;

    println!("3. A duplicate while the first call still runs (charges take 500 ms now):");
    ledger.set_delay(Duration::from_millis(500));
    let slow_key = format!("{key}-slow");
    let running = {
        let mut client = client.clone();
        let slow_key = slow_key.clone();
        tokio::spawn(async move { client.charge(call(Some(&slow_key), 700)).await })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    let err = client
        .charge(call(Some(&slow_key), 700))
        .await
        .err()
        .ok_or("the duplicate ran")?;
    println!(
        "  {:?}: {} (grpc-retry-pushback-ms: {:?})",
        err.code(),
        err.message(),
        err.metadata().get("grpc-retry-pushback-ms")
    );
    check(err.code() == Code::Aborted, "ABORTED")?;
    let done = running.await??;
    let after = client.charge(call(Some(&slow_key), 700)).await?;
    check(
        done.get_ref() == after.get_ref() && ledger.executions() == 2,
        "the retry after it finished replays it, charged once",
    )?;
    ledger.set_delay(Duration::ZERO);

    println!("4. No key:");
    let err = client
        .charge(call(None, 100))
        .await
        .err()
        .ok_or("a call without a key ran")?;
    println!("  {:?}: {}", err.code(), err.message());
    check(err.code() == Code::InvalidArgument, "INVALID_ARGUMENT")?;

    println!("{} charges made for {} calls.", ledger.charges().len(), 7);
    server.abort();
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match demo().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}
