//! `consumer`: publish a batch of payment events to the local NATS server (or,
//! with `--broker kafka://…`, a Kafka broker), some twice on purpose, consume
//! them effectively once into the order service's database, and print what
//! was processed and what was skipped.

use std::process::ExitCode;

const USAGE: &str = "usage: consumer [--broker URL] [--db URL]

  --broker  nats://HOST:PORT, a NATS server with JetStream (the default,
            nats://127.0.0.1:4222), or kafka://HOST:PORT, a Kafka broker
  --nats    the same as --broker nats://…
  --db      the order service's database (default sqlite://orders.db)";

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mut broker, mut db) = (
        "nats://127.0.0.1:4222".to_owned(),
        "sqlite://orders.db".to_owned(),
    );
    let mut it = args.into_iter();
    while let Some(flag) = it.next() {
        match (flag.as_str(), it.next()) {
            ("--broker", Some(v)) => broker = v,
            ("--nats", Some(v)) => broker = v,
            ("--db", Some(v)) => db = v,
            _ => {
                eprintln!("{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    match consumer::demo_on(&broker, &db).await {
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
