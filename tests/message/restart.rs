//! A consumer that is gone when its NATS server comes back ends `run`. The
//! test starts its own `nats-server` (on a free port, with its own store
//! directory, so the shared server on 4222 is untouched) and kills it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::{self, stream};
use idem_runtime::message::nats::JetStream;
use idem_runtime::message::Deduplicator;
use idem_runtime::MemoryStore;
use idem_tests::nats::{durable, watched_messages, OwnServer};

/// A consumer that disappeared while the client was disconnected never sends
/// "Consumer Deleted": `run` looks it up after the stream's errors and ends
/// with an error instead of pulling from nothing forever (found by the
/// break-it review of issue 11).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_ends_when_its_consumer_is_gone_after_a_reconnect() {
    let mut server = OwnServer::start(std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))).await;
    let client = server.client().await;
    let js = jetstream::new(client);
    js.create_stream(stream::Config {
        name: "GONE".into(),
        subjects: vec!["idem.gone".into()],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .unwrap();
    let consumer = durable(&js, "GONE", "vanishing", Duration::from_secs(30)).await;
    js.publish("idem.gone", "one".into())
        .await
        .unwrap()
        .await
        .unwrap();

    let side = JetStream::new(Deduplicator::new(MemoryStore::new(), "gone")).progress_every(None);
    let runs = AtomicUsize::new(0);
    let messages = watched_messages(&consumer).await;
    let run = side.run_stream(&consumer, messages, async |_m: &jetstream::Message| {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok::<_, std::io::Error>(())
    });
    let script = async {
        while runs.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.kill();
        // While the server is down the consumer goes away.
        let dir = server
            .asset_dir("vanishing")
            .expect("the consumer's directory");
        std::fs::remove_dir_all(dir).unwrap();
        server.launch().await;
        // The stream is there, the consumer is not.
        let stream = loop {
            if let Ok(s) = js.get_stream("GONE").await {
                break s;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(stream
            .get_consumer::<pull::Config>("vanishing")
            .await
            .is_err());
        tokio::time::sleep(Duration::from_secs(30)).await;
    };
    let out = tokio::select! {
        out = run => Some(out),
        () = script => None,
    };
    let out = out.expect("run still pulling 30 s after its consumer was found gone");
    assert!(out.is_err(), "{out:?}");
}
