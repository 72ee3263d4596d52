//! A JetStream consumer whose side effect is a row in PostgreSQL, written in the
//! same transaction as its idempotency record (`process_in_tx`). Run by the
//! NATS tests in-process and, to be SIGKILLed mid-batch, in `idem-test-worker`.

use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, PullConsumer};
use async_nats::jetstream::{self, stream, Message};
use futures_util::StreamExt as _;
use idem_runtime::message::nats::JetStream;
use idem_runtime::message::{Deduplicator, MessageId, Outcome, ProcessError};
use idem_runtime::{Error, PostgresStore};

/// The NATS server the tests use: `IDEM_NATS_URL`, or the local one.
pub fn nats_url() -> String {
    std::env::var("IDEM_NATS_URL").unwrap_or_else(|_| "127.0.0.1:4222".into())
}

/// A JetStream context on the test server.
pub async fn jetstream() -> jetstream::Context {
    let client = async_nats::connect(nats_url())
        .await
        .expect("connect to NATS");
    jetstream::new(client)
}

/// A stream name no other test run uses.
pub fn stream_name(prefix: &str) -> String {
    crate::unique(prefix).replace('_', "-").to_uppercase()
}

/// A new stream `name` on subject `idem.<name>`, and a durable pull consumer
/// `recorder` on it with explicit acks and unlimited redeliveries. The
/// stream's duplicate window is short, so duplicates published on purpose a
/// moment apart reach the consumer instead of being dropped by JetStream's own
/// publish dedup.
pub async fn stream_and_consumer(
    js: &jetstream::Context,
    name: &str,
    ack_wait: Duration,
) -> (String, PullConsumer) {
    let subject = format!("idem.{name}");
    js.create_stream(stream::Config {
        name: name.to_owned(),
        subjects: vec![subject.clone()],
        duplicate_window: Duration::from_millis(100),
        ..Default::default()
    })
    .await
    .expect("create stream");
    let consumer = durable(js, name, "recorder", ack_wait).await;
    (subject, consumer)
}

/// A durable pull consumer `consumer` on `stream`: explicit acks, unlimited
/// redeliveries.
pub async fn durable(
    js: &jetstream::Context,
    stream: &str,
    consumer: &str,
    ack_wait: Duration,
) -> PullConsumer {
    js.create_consumer_on_stream(
        pull::Config {
            durable_name: Some(consumer.into()),
            ack_policy: AckPolicy::Explicit,
            ack_wait,
            max_deliver: -1,
            ..Default::default()
        },
        stream,
    )
    .await
    .expect("create consumer")
}

/// Publishes `payload` (with `Nats-Msg-Id: id`, if given) and waits for the ack.
pub async fn publish(js: &jetstream::Context, subject: &str, id: Option<&str>, payload: &str) {
    let mut headers = async_nats::HeaderMap::new();
    if let Some(id) = id {
        headers.insert("Nats-Msg-Id", id);
    }
    js.publish_with_headers(subject.to_owned(), headers, payload.to_owned().into())
        .await
        .expect("publish")
        .await
        .expect("publish ack");
}

/// The next message of `consumer` (waiting up to 5 s).
pub async fn fetch_one(consumer: &PullConsumer) -> Message {
    consumer
        .fetch()
        .max_messages(1)
        .expires(Duration::from_secs(5))
        .messages()
        .await
        .expect("fetch")
        .next()
        .await
        .expect("a message")
        .expect("a delivery")
}

/// The message stream of `consumer` with heartbeats every 500 ms, so that a
/// server that goes away shows as a stream error within a second.
pub async fn watched_messages(consumer: &PullConsumer) -> pull::Stream {
    consumer
        .stream()
        .heartbeat(Duration::from_millis(500))
        .expires(Duration::from_secs(2))
        .messages()
        .await
        .expect("a message stream")
}

/// A `nats-server` of a test's own, on a free port with its own store
/// directory, to kill and restart (the shared server on 4222 is left alone).
pub struct OwnServer {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Its JetStream store directory.
    pub dir: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl OwnServer {
    fn binary() -> String {
        std::env::var("IDEM_NATS_SERVER").unwrap_or_else(|_| {
            [
                "/usr/sbin/nats-server",
                "/usr/bin/nats-server",
                "/usr/local/bin/nats-server",
            ]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or("nats-server")
            .to_owned()
        })
    }

    /// Starts one, with its store under `tmp`.
    pub async fn start(tmp: &std::path::Path) -> OwnServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = tmp.join(format!("nats-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("the store directory");
        let mut server = OwnServer {
            port,
            dir,
            child: None,
        };
        server.launch().await;
        server
    }

    /// `127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A client that reconnects every 100 ms while the server is away.
    pub async fn client(&self) -> async_nats::Client {
        async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .reconnect_delay_callback(|_| Duration::from_millis(100))
            .connect(self.url())
            .await
            .expect("connect to the own server")
    }

    /// Starts (again) on the same port and store, and waits until it listens.
    pub async fn launch(&mut self) {
        let child = std::process::Command::new(Self::binary())
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server starts");
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "nats-server did not come up"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILLs it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The directory of the JetStream asset `name` (a stream, a consumer) in
    /// its store.
    pub fn asset_dir(&self, name: &str) -> Option<std::path::PathBuf> {
        fn find(root: &std::path::Path, name: &str) -> Option<std::path::PathBuf> {
            for entry in std::fs::read_dir(root).ok()? {
                let path = entry.ok()?.path();
                if path.is_dir() {
                    if path.file_name().is_some_and(|n| n == name) {
                        return Some(path);
                    }
                    if let Some(found) = find(&path, name) {
                        return Some(found);
                    }
                }
            }
            None
        }
        find(&self.dir, name)
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Records one row per processed message in `table`; misbehaves on purpose
/// by the message's number (its payload) on its first delivery:
/// `n % 10 == 3` fails, `n % 50 == 7` runs longer than a 1 s `ack_wait`.
pub struct Effects {
    /// Where records and effects live.
    pub store: PostgresStore,
    /// The table of effects (`msg_id`, `pid`).
    pub table: String,
    /// The consumer side: deduplicator and acks.
    pub consumer: JetStream,
    /// What became of the deliveries this process handled.
    pub tally: crate::effects::Tally,
}

impl Effects {
    /// Connects, creates `table`, and keys messages in the namespace `namespace`
    /// (every consumer of one test shares it, and no other test run does).
    pub async fn setup(table: &str, namespace: &str) -> Self {
        let store = crate::effects::table(table).await;
        let dedup = Deduplicator::new(store.clone(), namespace).lease(Duration::from_secs(5));
        let consumer = JetStream::new(dedup)
            .progress_every(None)
            .nak_backoff(Duration::from_millis(50), Duration::from_millis(400));
        Effects {
            store,
            table: table.to_owned(),
            consumer,
            tally: crate::effects::Tally::default(),
        }
    }

    /// Handles one delivery: the effect and the record commit together.
    pub async fn handle(&self, message: &Message) -> Result<Outcome<()>, ProcessError<Error>> {
        let out = self.handle_once(message).await;
        self.tally.record(&out);
        out
    }

    async fn handle_once(&self, message: &Message) -> Result<Outcome<()>, ProcessError<Error>> {
        let n: u64 = std::str::from_utf8(&message.payload)
            .ok()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let first = message.info().map(|i| i.delivered).unwrap_or(1) == 1;
        let dedup = self.consumer.deduplicator();
        self.consumer
            .handle_with(message, async |id: &MessageId| {
                crate::effects::apply(&self.store, &self.table, dedup, id, n, first).await
            })
            .await
    }

    /// Pulls from `consumer` and handles every delivery, forever.
    pub async fn consume(&self, consumer: &PullConsumer) -> Result<(), async_nats::Error> {
        let mut messages = consumer.messages().await?;
        while let Some(message) = messages.next().await {
            let _ = self.handle(&message?).await;
        }
        Ok(())
    }

    /// `(distinct messages with an effect, most effects of one message, effects)`.
    pub async fn counts(&self) -> (i64, i64, i64) {
        crate::effects::counts(&self.store, &self.table).await
    }
}
