//! Effectively-once JetStream consumers against the real NATS server on
//! 127.0.0.1:4222, with every message's side effect counted in PostgreSQL.

use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;

use idem_runtime::message::nats::{given_id, message_id, JetStream};
use idem_runtime::message::{Deduplicator, MessageId, Outcome};
use idem_runtime::MemoryStore;
use idem_tests::nats::{jetstream, publish, stream_and_consumer, stream_name, Effects};
use idem_tests::unique;

/// Waits until every message is acknowledged and nothing is pending.
async fn drained(consumer: &mut PullConsumer, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let info = consumer.info().await.expect("consumer info");
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not drained: {} pending, {} unacknowledged",
            info.num_pending,
            info.num_ack_pending
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_keyed_by_nats_msg_id_then_stream_sequence() {
    let js = jetstream().await;
    let name = stream_name("ids");
    let (subject, consumer) = stream_and_consumer(&js, &name, Duration::from_secs(30)).await;
    publish(&js, &subject, Some("order-7"), "a").await;
    publish(&js, &subject, None, "b").await;
    let mut batch = consumer.fetch().max_messages(2).messages().await.unwrap();
    use futures::StreamExt as _;
    let first = batch.next().await.unwrap().unwrap();
    let second = batch.next().await.unwrap().unwrap();
    assert_eq!(message_id(&first), Some(MessageId::Given("order-7".into())));
    let stored = second.info().unwrap().published.unix_timestamp_nanos();
    assert_eq!(
        message_id(&second),
        Some(MessageId::position(&name, "2", stored.to_string()))
    );
    js.delete_stream(&name).await.unwrap();
}

/// Fetches `n` messages and handles each through `side`, counting runs.
async fn handle_batch(
    side: &JetStream,
    consumer: &PullConsumer,
    n: usize,
    runs: &std::sync::atomic::AtomicUsize,
) -> Vec<Outcome<()>> {
    use futures::StreamExt as _;
    let mut batch = consumer
        .fetch()
        .max_messages(n)
        .expires(Duration::from_secs(5))
        .messages()
        .await
        .unwrap();
    let mut outcomes = Vec::new();
    while let Some(message) = batch.next().await {
        let message = message.unwrap();
        let outcome = side
            .handle(&message, || async {
                runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok::<_, std::io::Error>(())
            })
            .await
            .unwrap();
        outcomes.push(outcome);
    }
    outcomes
}

/// A stream deleted and recreated under its name starts its sequences again:
/// its new messages are new, not duplicates of the old stream's (issue 11,
/// item 1); and a business id spelled like a position is not that position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_stream_is_a_new_stream_and_every_new_message_runs() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let js = jetstream().await;
    let name = stream_name("recreate");
    let runs = AtomicUsize::new(0);
    // One JetStream value throughout, so what it learned of the old stream is
    // still in it when the new one's messages arrive.
    let side = JetStream::new(Deduplicator::new(MemoryStore::new(), "recreate"));
    let (subject, consumer) = stream_and_consumer(&js, &name, Duration::from_secs(30)).await;
    for i in 0..3 {
        publish(&js, &subject, None, &format!("old {i}")).await;
    }
    let old = handle_batch(&side, &consumer, 3, &runs).await;
    assert_eq!(old, vec![Outcome::Processed(()); 3]);
    js.delete_stream(&name).await.unwrap();

    let (subject, consumer) = stream_and_consumer(&js, &name, Duration::from_secs(30)).await;
    for i in 0..3 {
        publish(&js, &subject, None, &format!("new {i}")).await;
    }
    let new = handle_batch(&side, &consumer, 3, &runs).await;
    assert_eq!(
        new,
        vec![Outcome::Processed(()); 3],
        "sequences 1-3 again, new messages"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 6);

    // Business ids spelled like the fallback forms are their own messages.
    let position = MessageId::position(&name, "1", "1700000000000000000");
    for spelled in [position.to_string(), format!("{name}:1")] {
        publish(&js, &subject, Some(&spelled), "spelled").await;
    }
    let spelled = handle_batch(&side, &consumer, 2, &runs).await;
    assert_eq!(spelled, vec![Outcome::Processed(()); 2]);
    assert_eq!(runs.load(Ordering::SeqCst), 8);
    js.delete_stream(&name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_published_on_purpose_are_acked_without_running() {
    let js = jetstream().await;
    let name = stream_name("dups");
    let (subject, mut consumer) = stream_and_consumer(&js, &name, Duration::from_secs(30)).await;
    for round in 0..2 {
        for i in 0..20 {
            publish(&js, &subject, Some(&format!("m{i}")), &format!("{round}")).await;
        }
        // Past JetStream's duplicate window, so the second round is delivered too.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        js.get_stream(&name)
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .state
            .messages,
        40
    );

    let side = JetStream::new(Deduplicator::new(MemoryStore::new(), "dups"));
    let runs = std::sync::atomic::AtomicUsize::new(0);
    let mut messages = consumer.messages().await.unwrap();
    let (mut processed, mut duplicates) = (0, 0);
    use futures::StreamExt as _;
    while processed + duplicates < 40 {
        let message = messages.next().await.unwrap().unwrap();
        match side
            .handle(&message, || async {
                runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok::<_, std::io::Error>(())
            })
            .await
        {
            Ok(Outcome::Processed(())) => processed += 1,
            Ok(Outcome::Duplicate) => duplicates += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((processed, duplicates), (20, 20));
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 20);
    drained(&mut consumer, Duration::from_secs(10)).await; // duplicates were acked
    js.delete_stream(&name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_handler_sends_progress_and_is_not_redelivered() {
    let js = jetstream().await;
    let name = stream_name("wpi");
    let (subject, mut consumer) = stream_and_consumer(&js, &name, Duration::from_millis(600)).await;
    publish(&js, &subject, Some("slow"), "x").await;
    let side = JetStream::new(Deduplicator::new(MemoryStore::new(), "wpi"))
        .progress_every(Some(Duration::from_millis(150)));
    let mut messages = consumer.messages().await.unwrap();
    use futures::StreamExt as _;
    let message = messages.next().await.unwrap().unwrap();
    let out = side
        .handle(&message, || async {
            // Three times the ack wait.
            tokio::time::sleep(Duration::from_millis(1800)).await;
            Ok::<_, std::io::Error>(())
        })
        .await;
    assert!(matches!(out, Ok(Outcome::Processed(()))));
    drained(&mut consumer, Duration::from_secs(10)).await;
    let info = consumer.info().await.unwrap();
    assert_eq!(
        info.num_redelivered, 0,
        "+WPI kept the message with its consumer"
    );
    assert_eq!(info.delivered.stream_sequence, 1);
    js.delete_stream(&name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_error_naks_and_the_redelivery_runs_it() {
    let js = jetstream().await;
    let name = stream_name("nak");
    let (subject, mut consumer) = stream_and_consumer(&js, &name, Duration::from_secs(30)).await;
    publish(&js, &subject, Some("fails-once"), "x").await;
    let side = JetStream::new(Deduplicator::new(MemoryStore::new(), "nak"))
        .nak_backoff(Duration::from_millis(50), Duration::from_millis(50));
    let mut messages = consumer.messages().await.unwrap();
    use futures::StreamExt as _;
    let first = messages.next().await.unwrap().unwrap();
    let failed = side
        .handle(&first, || async {
            Err::<(), _>(std::io::Error::other("down"))
        })
        .await;
    assert!(failed.is_err());
    let again = messages.next().await.unwrap().unwrap();
    assert_eq!(again.info().unwrap().delivered, 2);
    let ok = side
        .handle(&again, || async { Ok::<_, std::io::Error>(7) })
        .await;
    assert!(matches!(ok, Ok(Outcome::Processed(7))));
    drained(&mut consumer, Duration::from_secs(10)).await;
    js.delete_stream(&name).await.unwrap();
}

/// 1,000 messages (and 100 duplicates published on purpose) through three
/// consumers on one durable consumer with a 1 s ack wait: one in its own OS
/// process, SIGKILLed mid-batch, and two in this process. Every 10th message's
/// handler fails on its first delivery, every 50th outlives the ack wait (so
/// it is redelivered to another consumer while it runs). Each message's effect,
/// written in PostgreSQL in the same transaction as its record, exists once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_messages_take_effect_exactly_once_through_redeliveries_and_a_kill() {
    let js = jetstream().await;
    let name = stream_name("once");
    let (subject, mut consumer) = stream_and_consumer(&js, &name, Duration::from_secs(1)).await;
    let table = unique("nats_effects");
    let effects = std::sync::Arc::new(Effects::setup(&table, &name).await); // namespace: this run's stream

    for i in 0..1000 {
        publish(&js, &subject, Some(&format!("pay-{i}")), &i.to_string()).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await; // past the duplicate window
    for i in (0..1000).step_by(10) {
        publish(&js, &subject, Some(&format!("pay-{i}")), &i.to_string()).await;
    }

    // A consumer in its own process, killed once it has taken effect on some.
    let mut worker = tokio::process::Command::new(env!("CARGO_BIN_EXE_idem-test-worker"))
        .args(["consume-nats", &name, "recorder", &table])
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn worker");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while effects.counts().await.0 < 100 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker processed nothing"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    worker.start_kill().expect("SIGKILL the worker");
    worker.wait().await.expect("reap the worker");

    let consumers: Vec<_> = (0..2)
        .map(|_| {
            let (effects, consumer) = (effects.clone(), consumer.clone());
            tokio::spawn(async move { effects.consume(&consumer).await })
        })
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while effects.counts().await.0 < 1000 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {:?} effects",
            effects.counts().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drained(&mut consumer, Duration::from_secs(60)).await;
    for task in consumers {
        task.abort();
    }
    let (distinct, most, total) = effects.counts().await;
    assert_eq!(
        (distinct, most, total),
        (1000, 1, 1000),
        "each message took effect once"
    );
    let tally = &effects.tally;
    let load = |c: &std::sync::atomic::AtomicUsize| c.load(std::sync::atomic::Ordering::SeqCst);
    println!("in this process: {tally:?}");
    assert!(
        load(&tally.failed) > 0,
        "failed handlers were redelivered and retried"
    );
    assert!(
        load(&tally.duplicates) > 0,
        "duplicates were acknowledged without running"
    );
    js.delete_stream(&name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_handles_many_messages_at_once_and_each_once() {
    let js = jetstream().await;
    let name = stream_name("run");
    let (subject, consumer) = stream_and_consumer(&js, &name, Duration::from_secs(30)).await;
    for i in 0..200 {
        publish(
            &js,
            &subject,
            Some(&format!("r{}", i % 150)),
            &i.to_string(),
        )
        .await;
        if i == 149 {
            tokio::time::sleep(Duration::from_millis(200)).await; // past the duplicate window
        }
    }
    let side = JetStream::new(Deduplicator::new(MemoryStore::new(), "run")).concurrency(8);
    let seen = std::sync::Mutex::new(std::collections::HashMap::<String, usize>::new());
    let run = side.run(
        &consumer,
        async |message: &async_nats::jetstream::Message| {
            let id = given_id(message).unwrap().to_owned();
            *seen.lock().unwrap().entry(id).or_default() += 1;
            Ok::<_, std::io::Error>(())
        },
    );
    let mut probe = consumer.clone();
    tokio::select! {
        out = run => panic!("the consumer stopped: {out:?}"),
        _ = drained(&mut probe, Duration::from_secs(30)) => {}
    }
    let seen = seen.into_inner().unwrap();
    assert_eq!(seen.len(), 150);
    assert!(seen.values().all(|&n| n == 1), "each message ran once");
    js.delete_stream(&name).await.unwrap();
}
