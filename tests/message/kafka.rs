//! Effectively-once Kafka consumers against a real Kafka-protocol broker
//! process (tansu, on 127.0.0.1:9092; `scripts/test.sh` installs and starts
//! it), with every message's side effect counted in PostgreSQL, written in the
//! same transaction as its record.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem_runtime::message::kafka::Kafka;
use idem_runtime::message::Deduplicator;
use idem_runtime::MemoryStore;
use idem_tests::kafka::{
    committed, consumer, create_topic, delete_topic, produce, producer, recreate_topic, Effects,
};
use idem_tests::unique;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::Message as _;

/// Waits until `done` (checked every 100 ms), at most `secs` seconds.
async fn until(secs: u64, what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !done().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Where each produced message landed: (partition, offset) → its number.
type Landed = HashMap<(i32, i64), u64>;

/// Produces messages `numbers` with business ids `pay-{n}`.
async fn publish(topic: &str, numbers: impl Iterator<Item = u64>) -> Landed {
    let producer = producer();
    let mut landed = HashMap::new();
    for n in numbers {
        let at = produce(&producer, topic, Some(&format!("pay-{n}")), &n.to_string()).await;
        landed.insert(at, n);
    }
    landed
}

/// Every offset below a committed one has taken effect: the group's commits
/// never pass an unfinished message. Reads the commits first: effects only grow.
async fn commits_never_pass_unfinished(
    effects: &Effects,
    group: &str,
    topic: &str,
    landed: &Landed,
) {
    let commits = committed(group, topic, 3);
    let done: std::collections::HashSet<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT DISTINCT msg_id FROM {}",
        effects.table
    )))
    .fetch_all(effects.store.pool())
    .await
    .unwrap()
    .into_iter()
    .collect();
    for (&(partition, offset), n) in landed {
        if commits[&partition].is_some_and(|c| offset < c) {
            assert!(
                done.contains(&format!("pay-{n}")),
                "partition {partition} committed past offset {offset} (message {n}), which has no effect"
            );
        }
    }
}

/// 1,000 messages (and 100 published twice on purpose) through consumers of
/// one group: one in its own OS process, SIGKILLed mid-batch, then that
/// process restarted beside a consumer in this process. Every 10th message's
/// handler fails on its first delivery (in each process), every 50th is slow.
/// Each message's effect exists once; every commit read back from the broker
/// is behind the first unfinished message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_messages_take_effect_exactly_once_through_failures_and_a_kill() {
    let _turn = crate::KAFKA.lock().await;
    // The consumers run as local tasks: `run_with`'s handler borrows.
    tokio::task::LocalSet::new()
        .run_until(a_thousand_messages_take_effect_exactly_once_through_failures_and_a_kill_body())
        .await;
}

async fn a_thousand_messages_take_effect_exactly_once_through_failures_and_a_kill_body() {
    let topic = unique("once");
    let group = format!("{topic}-group");
    let table = unique("kafka_effects");
    create_topic(&topic, 3).await;
    let effects = Arc::new(Effects::setup(&table, &topic).await);
    let mut landed = publish(&topic, 0..1000).await;
    landed.extend(publish(&topic, (0..1000).step_by(10)).await);

    let worker = || {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_idem-test-worker"))
            .args(["consume-kafka", &topic, &group, &table, &topic])
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn worker")
    };
    let mut first = worker();
    until(90, "the worker processed some", async || {
        effects.counts().await.0 >= 100
    })
    .await;
    first.start_kill().expect("SIGKILL the worker");
    first.wait().await.expect("reap the worker");
    commits_never_pass_unfinished(&effects, &group, &topic, &landed).await;

    // The consumer process restarted, beside one more consumer in this process.
    let _restarted = worker();
    let consumers = {
        let (effects, topic, group) = (effects.clone(), topic.clone(), group.clone());
        vec![tokio::task::spawn_local(async move {
            effects.consume(&consumer(&group, &topic)).await
        })]
    };
    until(180, "every message took effect", async || {
        commits_never_pass_unfinished(&effects, &group, &topic, &landed).await;
        effects.counts().await.0 == 1000
    })
    .await;
    let ends: HashMap<i32, i64> = landed.keys().fold(HashMap::new(), |mut ends, &(p, o)| {
        let end = ends.entry(p).or_insert(0);
        *end = (*end).max(o + 1);
        ends
    });
    until(60, "every offset committed", async || {
        committed(&group, &topic, 3)
            .iter()
            .all(|(p, c)| *c == ends.get(p).copied())
    })
    .await;
    for task in consumers {
        task.abort();
    }
    assert_eq!(
        effects.counts().await,
        (1000, 1, 1000),
        "each message took effect once"
    );
    let load = |c: &std::sync::atomic::AtomicUsize| c.load(std::sync::atomic::Ordering::SeqCst);
    println!("in this process: {:?}", effects.tally);
    assert!(
        load(&effects.tally.failed) > 0,
        "failed handlers were read again"
    );
    assert!(
        load(&effects.tally.duplicates) > 0,
        "duplicates were skipped"
    );
}

/// Two consumers of one group while messages flow; a third joins, then one
/// leaves (each a rebalance). Exactly once, and no commit read back from the
/// broker ever passes a message without its effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalances_while_messages_flow_keep_every_effect_once() {
    let _turn = crate::KAFKA.lock().await;
    // The consumers run as local tasks: `run_with`'s handler borrows.
    tokio::task::LocalSet::new()
        .run_until(rebalances_while_messages_flow_keep_every_effect_once_body())
        .await;
}

async fn rebalances_while_messages_flow_keep_every_effect_once_body() {
    let topic = unique("rebalance");
    let group = format!("{topic}-group");
    let table = unique("kafka_effects");
    create_topic(&topic, 3).await;
    let effects = Arc::new(Effects::setup(&table, &topic).await);
    let landed = Arc::new(Mutex::new(Landed::new()));
    let start = |effects: Arc<Effects>| {
        let (topic, group) = (topic.clone(), group.clone());
        tokio::task::spawn_local(async move { effects.consume(&consumer(&group, &topic)).await })
    };
    let first = start(effects.clone());
    let second = start(effects.clone());
    let producing = {
        let (topic, landed) = (topic.clone(), landed.clone());
        tokio::spawn(async move {
            for chunk in 0..6u64 {
                let batch = publish(&topic, chunk * 100..(chunk + 1) * 100).await;
                landed.lock().unwrap().extend(batch);
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    let snapshot = || landed.lock().unwrap().clone();
    until(90, "some effects before the third joins", async || {
        effects.counts().await.0 >= 100
    })
    .await;
    let third = start(effects.clone());
    until(90, "more effects with three consumers", async || {
        commits_never_pass_unfinished(&effects, &group, &topic, &snapshot()).await;
        effects.counts().await.0 >= 300
    })
    .await;
    first.abort(); // leaves the group: its partitions move to the others
    producing.await.unwrap();
    until(180, "every message took effect", async || {
        commits_never_pass_unfinished(&effects, &group, &topic, &snapshot()).await;
        effects.counts().await.0 == 600
    })
    .await;
    second.abort();
    third.abort();
    assert_eq!(
        effects.counts().await,
        (600, 1, 600),
        "each message took effect once"
    );
}

/// Without a business id a message is keyed by its place: topic, partition and
/// offset, qualified by its timestamp. A second group reading the same messages
/// (same consumer namespace) finds them done; a topic deleted and recreated
/// under the same name starts its offsets again, and its messages run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_business_id_the_place_is_the_key_even_across_a_recreated_topic() {
    let _turn = crate::KAFKA.lock().await;
    let topic = unique("fallback");
    create_topic(&topic, 1).await;
    let producer = producer();
    for n in 0..10 {
        produce(&producer, &topic, None, &n.to_string()).await;
    }
    let store = MemoryStore::new();
    let runs = Arc::new(Mutex::new(Vec::<(i64, String)>::new()));
    let read_all = async |group: String, expect: usize| {
        let side = Kafka::new(Deduplicator::new(store.clone(), "fallback"));
        let consumer = consumer(&group, &topic);
        let run = side.run(
            &consumer,
            async |m: &rdkafka::message::BorrowedMessage<'_>| {
                let text = m
                    .payload_view::<str>()
                    .and_then(Result::ok)
                    .unwrap_or("")
                    .to_owned();
                runs.lock().unwrap().push((m.offset(), text));
                Ok::<_, std::io::Error>(())
            },
        );
        let watch = until(60, "the group caught up", async || {
            committed(&group, &topic, 1)[&0] == Some(expect as i64)
        });
        tokio::select! {
            out = run => panic!("the consumer stopped: {out:?}"),
            () = watch => {}
        }
    };
    read_all(format!("{topic}-a"), 10).await;
    assert_eq!(runs.lock().unwrap().len(), 10, "each message ran once");
    read_all(format!("{topic}-b"), 10).await;
    assert_eq!(
        runs.lock().unwrap().len(),
        10,
        "a second group finds them done"
    );

    // No client of the topic is alive while it is deleted: librdkafka 2.12's
    // metadata cache has crashed (SIGSEGV in rd_kafka_metadata_cache_find) when
    // a live client's refresh met the deleted topic.
    drop(producer);
    delete_topic(&topic).await;
    recreate_topic(&topic, 1).await;
    let producer = idem_tests::kafka::producer();
    for n in 10..15 {
        produce(&producer, &topic, None, &n.to_string()).await;
    }
    read_all(format!("{topic}-c"), 5).await;
    let runs = runs.lock().unwrap().clone();
    assert_eq!(
        runs.len(),
        15,
        "the recreated topic's messages ran: {runs:?}"
    );
    assert!(
        runs[10..]
            .iter()
            .all(|(_, t)| t.parse::<u64>().unwrap() >= 10),
        "{runs:?}"
    );
    assert_eq!(runs[10].0, 0, "offsets started again at 0");
}

/// The premise of the rebalance test above, which counts effects: the broker
/// really moves partitions when a third member joins and one leaves (with the
/// same consumer settings). Written by the break-it review of issue 13.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tansu_moves_partitions_when_members_join_and_leave() {
    let _turn = crate::KAFKA.lock().await;
    let topic = unique("moves");
    let group = format!("{topic}-group");
    create_topic(&topic, 3).await;
    let assigned =
        |c: &StreamConsumer| -> usize { c.assignment().map(|l| l.count()).unwrap_or_default() };
    // Polls each member in turn, on this task, until `done`: each takes part
    // in the group's rebalances, and none is dropped while another thread polls it.
    async fn settle(members: &[&StreamConsumer], what: &str, done: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            for member in members {
                let _ = tokio::time::timeout(Duration::from_millis(50), member.recv()).await;
            }
        }
    }
    let a = consumer(&group, &topic);
    let b = consumer(&group, &topic);
    settle(&[&a, &b], "two members share three partitions", || {
        assigned(&a) + assigned(&b) == 3 && assigned(&a) > 0 && assigned(&b) > 0
    })
    .await;
    let c = consumer(&group, &topic);
    settle(&[&a, &b, &c], "a third member gets one", || {
        (assigned(&a), assigned(&b), assigned(&c)) == (1, 1, 1)
    })
    .await;
    drop(a);
    settle(&[&b, &c], "the first one's partition moves", || {
        assigned(&b) + assigned(&c) == 3
    })
    .await;
    drop((b, c));
}
