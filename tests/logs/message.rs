//! A JetStream consumer whose NATS server is killed and restarted under it
//! (issue 11, item 1): `run` logs the stream's errors and goes on, the
//! handlers in flight finish and are acknowledged, every message runs once;
//! and what the adapter logs carries digests, never the message ids.
//!
//! It starts its own `nats-server` (on a free port, with its own store
//! directory, so the shared server on 4222 is untouched).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use idem_runtime::message::nats::{given_id, JetStream};
use idem_runtime::message::Deduplicator;
use idem_runtime::MemoryStore;
use idem_tests::logs::Captured;
use idem_tests::nats::{durable, watched_messages, OwnServer};
use tokio::sync::Semaphore;

/// Waits for `done`, checking every 50 ms, for at most a minute.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Publishes until the server acknowledges (the client may be reconnecting);
/// the `Nats-Msg-Id` makes a repeated publish one message.
async fn publish_until_acked(js: &jetstream::Context, subject: &str, id: &str) {
    loop {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", id);
        let sent = js
            .publish_with_headers(subject.to_owned(), headers, id.to_owned().into())
            .await;
        if let Ok(ack) = sent {
            if ack.await.is_ok() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const SECRET: &str = "secret-payment";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_survives_a_server_restart_and_finishes_what_it_was_doing() {
    let captured = Captured::global();

    let mut server = OwnServer::start(std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))).await;
    let client = server.client().await;
    let js = jetstream::new(client);
    let subject = "idem.restart";
    js.create_stream(stream::Config {
        name: "RESTART".into(),
        subjects: vec![subject.into()],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .unwrap();
    let consumer = durable(&js, "RESTART", "recorder", Duration::from_secs(30)).await;

    // The first four messages wait at the gate until the server has been
    // killed and restarted; the first delivery of #5 fails (a warning names it
    // by digest only).
    let gate = Semaphore::new(0);
    let started: Mutex<HashMap<String, usize>> = Mutex::default();
    let finished: Mutex<HashMap<String, usize>> = Mutex::default();
    let failed_once = std::sync::atomic::AtomicBool::new(false);
    let id = |n: usize| format!("{SECRET}-{n}");
    let slow: Vec<String> = (0..4).map(id).collect();
    let side = JetStream::new(Deduplicator::new(MemoryStore::new(), "restart"))
        .concurrency(8)
        .progress_every(Some(Duration::from_secs(1)))
        .nak_backoff(Duration::from_millis(50), Duration::from_millis(200));
    let messages = watched_messages(&consumer).await;
    let run = side.run_stream(&consumer, messages, async |message: &jetstream::Message| {
        let id = given_id(message).unwrap().to_owned();
        *started.lock().unwrap().entry(id.clone()).or_default() += 1;
        if slow.contains(&id) {
            gate.acquire().await.unwrap().forget();
        }
        if id.ends_with("-5") && !failed_once.swap(true, std::sync::atomic::Ordering::SeqCst) {
            // (What a handler puts in its own error is its business: this one names no id.)
            return Err("the ledger refused the payment".to_owned());
        }
        *finished.lock().unwrap().entry(id).or_default() += 1;
        Ok(())
    });

    let script = async {
        for n in 0..20 {
            publish_until_acked(&js, subject, &id(n)).await;
        }
        until("the slow handlers start", || {
            let started = started.lock().unwrap();
            slow.iter().all(|id| started.contains_key(id))
        })
        .await;
        server.kill();
        until("the stream reports the server gone", || {
            captured
                .idem_lines()
                .iter()
                .any(|l| l.contains("message stream error; still pulling"))
        })
        .await;
        server.launch().await;
        gate.add_permits(slow.len());
        for n in 20..40 {
            publish_until_acked(&js, subject, &id(n)).await;
        }
        until("every message finishes", || {
            finished.lock().unwrap().len() == 40
        })
        .await;
        let mut probe = consumer.clone();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(info) = probe.info().await {
                if info.num_pending == 0 && info.num_ack_pending == 0 {
                    break;
                }
            }
            assert!(tokio::time::Instant::now() < deadline, "never drained");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::select! {
        out = run => panic!("the consumer stopped under a restart: {out:?}"),
        () = script => {}
    }

    let started = started.into_inner().unwrap();
    let finished = finished.into_inner().unwrap();
    for n in 0..40 {
        let id = id(n);
        let runs = if n == 5 { 2 } else { 1 };
        assert_eq!(
            started[&id], runs,
            "{id} started once (and its retry after the failure)"
        );
        assert_eq!(finished[&id], 1, "{id} took effect once");
    }

    // What the adapter logged names messages by digest, never by id.
    let lines = captured.idem_lines();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("message not processed") && l.contains("digest=")),
        "the failure was logged: {lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("namespace=\"idem::message::restart\"")),
        "claims are traced under the consumer's own namespace: {lines:#?}"
    );
    let leaked: Vec<_> = lines.iter().filter(|l| l.contains(SECRET)).collect();
    assert!(leaked.is_empty(), "message ids in the log: {leaked:#?}");
}
