//! `order-service`: the example order service, as an HTTP server (`serve`) or a
//! self-driving demo of every case (`demo`).

use std::process::ExitCode;

use order_service::{server, Db, OrderService};

const USAGE: &str = "usage: order-service demo [--db URL]
       order-service serve [--addr ADDR] [--db URL] [--key-store STORE]

  demo         start the server on a free port and drive every case over HTTP
  serve        run the HTTP server until Ctrl-C
  --addr       where to listen (default 127.0.0.1:8080)
  --db         where orders (and by default idempotency records) live:
               sqlite://orders.db (the default), sqlite::memory:, or postgres://user@host/db
  --key-store  where the HTTP layer keeps its records: memory, sqlite,
               sqlite://FILE, postgres://..., redis://... (default: the --db database)";

const DEFAULT_DB: &str = "sqlite://orders.db";
const DEFAULT_ADDR: &str = "127.0.0.1:8080";

/// Parsed `--flag value` pairs; `None` on an unknown flag or a missing value.
fn flags<'a>(rest: &[&'a str], known: &[&str]) -> Option<Vec<(&'a str, &'a str)>> {
    let mut out = Vec::new();
    let mut it = rest.iter();
    while let Some(flag) = it.next() {
        if !known.contains(flag) {
            return None;
        }
        out.push((*flag, *it.next()?));
    }
    Some(out)
}

fn flag<'a>(flags: &[(&'a str, &'a str)], name: &str) -> Option<&'a str> {
    flags
        .iter()
        .rev()
        .find(|(f, _)| *f == name)
        .map(|(_, v)| *v)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // RUST_LOG as tracing-subscriber reads it (`RUST_LOG=off`, `=debug`,
    // `=idem_runtime=debug`, ...). Unset: warnings from `serve`, errors only
    // from the demo (whose refusals are on purpose).
    let default = if args.first() == Some(&"demo") {
        "error"
    } else {
        "warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let usage = || {
        eprintln!("{USAGE}");
        ExitCode::from(2)
    };
    match args.as_slice() {
        ["demo", rest @ ..] => {
            let Some(flags) = flags(rest, &["--db"]) else {
                return usage();
            };
            let url = flag(&flags, "--db").unwrap_or(DEFAULT_DB);
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
        ["serve", rest @ ..] => {
            let Some(flags) = flags(rest, &["--addr", "--db", "--key-store"]) else {
                return usage();
            };
            let addr = flag(&flags, "--addr").unwrap_or(DEFAULT_ADDR);
            let url = flag(&flags, "--db").unwrap_or(DEFAULT_DB);
            match serve(addr, url, flag(&flags, "--key-store")).await {
                Ok(()) => ExitCode::SUCCESS,
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
        _ => usage(),
    }
}

async fn serve(
    addr: &str,
    url: &str,
    key_store: Option<&str>,
) -> Result<(), Box<dyn std::error::Error>> {
    let service = OrderService::new(Db::open(url).await?);
    // SKU-0001 to SKU-0010 start with 1,000 in stock, so a first curl succeeds.
    service.seed_catalogue().await?;
    let keys = server::key_store(key_store, service.db()).await?;
    let running = server::start(addr, service, keys).await?;
    println!(
        "order-service listening on {} (orders in {url}, idempotency records in {})",
        running.url(),
        key_store.unwrap_or("the same database")
    );
    println!(
        "try: curl -i -X POST {}/orders -H 'Authorization: Bearer ann' -H 'Idempotency-Key: k1' \
         -H 'content-type: application/json' -d '{{\"user_id\":\"ann\",\"product_id\":\"SKU-0001\",\"quantity\":1}}'",
        running.url()
    );
    tokio::signal::ctrl_c().await?;
    running.stop().await?;
    Ok(())
}
