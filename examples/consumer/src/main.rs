//! `consumer`: publish a batch of payment events to the local NATS server (some
//! twice on purpose), consume them effectively once into the order service's
//! database, and print what was processed and what was skipped.

use std::process::ExitCode;

const USAGE: &str = "usage: consumer [--nats URL] [--db URL]

  --nats  the NATS server with JetStream (default 127.0.0.1:4222)
  --db    the order service's database (default sqlite://orders.db)";

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mut nats, mut db) = ("127.0.0.1:4222".to_owned(), "sqlite://orders.db".to_owned());
    let mut it = args.into_iter();
    while let Some(flag) = it.next() {
        match (flag.as_str(), it.next()) {
            ("--nats", Some(v)) => nats = v,
            ("--db", Some(v)) => db = v,
            _ => {
                eprintln!("{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    match consumer::demo(&nats, &db).await {
        Ok(report) => {
            print!("{report}");
            if report.all_once() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("consumer: {e}");
            ExitCode::FAILURE
        }
    }
}
