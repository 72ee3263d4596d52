//! `order-service demo`: drive the order service through duplicates, retries,
//! a changed payload and a failing call, and print what happened.

use std::process::ExitCode;

const USAGE: &str = "usage: order-service demo [--db URL]

  demo    run the self-driving demo in one process
  --db    where orders and idempotency records live:
          sqlite://orders.db (the default), sqlite::memory:, or postgres://user@host/db";

const DEFAULT_DB: &str = "sqlite://orders.db";

#[tokio::main]
async fn main() -> ExitCode {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(std::io::stderr)
            .init();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["demo", rest @ ..] => {
            let url = match rest {
                [] => DEFAULT_DB,
                ["--db", url] => url,
                _ => {
                    eprintln!("{USAGE}");
                    return ExitCode::from(2);
                }
            };
            match order_service::demo::run(url).await {
                Ok(report) => {
                    print!("{report}");
                    if report.all_passed() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("order-service: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        ["-h" | "--help" | "help"] => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}
