//! The `idem` binary against real stores: records made by `#[idempotent]`
//! are inspected, listed, counted, released, invalidated and purged, and
//! the next call runs again or resumes as the command promised.

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use idem_runtime::key::KeyBuilder;
use idem_runtime::store::admin::{Admin, Status};
use idem_runtime::{idempotent, Claim, ClaimRequest, Error, RedisStore, SqliteStore, Store};
use serde_json::Value;

/// The namespace of [`create`] and [`charge`]: a `name`, so the CLI can be
/// given it as written.
const NS: &str = "cli::orders";

#[idempotent(name = "cli::orders", key = (order), store = store, ttl = "1h")]
async fn create(store: &dyn Store, order: u64, runs: &AtomicU32) -> Result<u64, Error> {
    runs.fetch_add(1, Ordering::SeqCst);
    Ok(order * 10)
}

/// Records a step (counted in `charged`), then fails when `fail`: the claim
/// is released and the step kept.
#[idempotent(name = "cli::orders", key = (order), store = store, ttl = "1h")]
async fn charge(
    store: &dyn Store,
    order: u64,
    charged: &AtomicU32,
    fail: bool,
) -> Result<u64, Error> {
    let paid: u64 = idem_runtime::step("charge", async {
        charged.fetch_add(1, Ordering::SeqCst);
        Ok::<_, Error>(order)
    })
    .await?;
    if fail {
        return Err(Error::store("the shipping service is down"));
    }
    Ok(paid)
}

fn key(order: u64) -> String {
    KeyBuilder::new(NS)
        .part(&order)
        .finish()
        .unwrap()
        .as_str()
        .to_owned()
}

/// Runs `idem` with `store_args` then `args`: the exit code, stdout, stderr.
async fn idem(store_args: &[String], args: &[&str]) -> (i32, String, String) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(store_args)
        .args(args)
        .env_remove("IDEM_STORE")
        .output()
        .await
        .expect("run idem");
    (
        output.status.code().expect("an exit code"),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

/// [`idem`] with `--json`: the exit code and the one JSON document.
async fn idem_json(store_args: &[String], args: &[&str]) -> (i32, Value) {
    let mut all = args.to_vec();
    all.push("--json");
    let (code, out, err) = idem(store_args, &all).await;
    let doc = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("one JSON document for {args:?} ({e}): {out:?} / {err}"));
    (code, doc)
}

/// A record the store holds but cannot read, under `corrupt`: `inspect` and
/// `inspect --digest` fail (exit 4), while `list` and `stats` report it apart
/// and go on with the other records ([`corrupt_listed`] checks `--stuck`).
async fn corrupt_scenario(s: &[String], corrupt: &str) {
    let (code, _, err) = idem(s, &["inspect", corrupt]).await;
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("corrupt"), "{err}");
    let digest = corrupt.rsplit(':').next().unwrap();
    let (code, _, err) = idem(s, &["inspect", "--digest", digest]).await;
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("corrupt"), "{err}");

    let (code, doc) = idem_json(s, &["list", "--namespace", NS, "--limit", "1000"]).await;
    assert_eq!(code, 0, "{doc}");
    let records = doc["records"].as_array().unwrap();
    let found = records
        .iter()
        .find(|r| r["key"] == corrupt)
        .unwrap_or_else(|| panic!("the corrupt record listed: {doc}"));
    assert_eq!(found["status"], "corrupt", "{doc}");
    assert!(
        found["problem"]
            .as_str()
            .is_some_and(|p| p.contains("corrupt")),
        "{doc}"
    );
    assert!(
        records.iter().any(|r| r["status"] != "corrupt"),
        "the readable records listed beside it: {doc}"
    );
    let (code, out, err) = idem(s, &["list", "--namespace", NS, "--limit", "1000"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("{corrupt}: ")),
        "the problem, by its key: {out}"
    );

    let (code, doc) = idem_json(s, &["stats"]).await;
    assert_eq!(code, 0, "{doc}");
    let ns = doc["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["namespace"] == NS)
        .unwrap_or_else(|| panic!("{doc}"));
    assert_eq!(ns["corrupt"], 1, "{doc}");
    assert!(ns["records"].as_u64().unwrap() > 1, "{doc}");
    let (code, out, err) = idem(s, &["stats"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("CORRUPT"), "{out}");
}

/// After [`corrupt_scenario`], with more unreadable records: each is listed
/// as `corrupt` with a problem holding one of `problems`, `stats` counts
/// `total` corrupt records, and `list --stuck` lists none of them.
async fn corrupt_listed(s: &[String], problems: &[&str], total: u64) {
    let (code, doc) = idem_json(s, &["list", "--limit", "1000"]).await;
    assert_eq!(code, 0, "{doc}");
    let records = doc["records"].as_array().unwrap();
    for problem in problems {
        assert!(
            records.iter().any(|r| r["status"] == "corrupt"
                && r["problem"].as_str().is_some_and(|p| p.contains(problem))),
            "a corrupt record whose problem says {problem:?}: {doc}"
        );
    }
    let (code, doc) = idem_json(s, &["stats"]).await;
    assert_eq!(
        (code, doc["total"]["corrupt"].as_u64()),
        (0, Some(total)),
        "{doc}"
    );
    let (code, doc) = idem_json(s, &["list", "--stuck", "--limit", "1000"]).await;
    assert_eq!(code, 0, "{doc}");
    assert!(
        doc["records"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["status"] == "lapsed"),
        "{doc}"
    );
}

/// Every command on one store, checked through the store and the next call.
async fn scenario(store: &dyn Admin, store_args: &[String]) {
    let s = store_args;
    let runs = AtomicU32::new(0);
    let (k1, k2, k3) = (key(1), key(2), key(3));

    // A completed record, made by the attribute, found by the key parts.
    assert_eq!(create(store, 1, &runs).await.unwrap(), 10);
    let (code, doc) = idem_json(s, &["inspect", NS, "[1]"]).await;
    assert_eq!(code, 0, "{doc}");
    assert_eq!(doc["key"], k1.as_str());
    assert_eq!(doc["status"], "completed");
    assert_eq!(doc["namespace"], NS);
    assert_eq!(doc["outcome_bytes"], 9, "{{\"ok\":10}}");
    let token = doc["token"].as_str().unwrap().to_owned();
    let (code, out, _) = idem(s, &["inspect", &k1]).await;
    assert_eq!(code, 0);
    assert!(out.contains("completed") && out.contains(&token), "{out}");
    let digest = &k1[k1.len() - 64..];
    let (code, doc) = idem_json(s, &["inspect", "--digest", digest]).await;
    assert_eq!((code, doc["key"].as_str()), (0, Some(k1.as_str())));
    let (code, doc) = idem_json(s, &["list", "--namespace", NS]).await;
    assert_eq!(code, 0);
    assert_eq!(doc["count"], 1, "{doc}");
    let (code, doc) = idem_json(s, &["stats"]).await;
    assert_eq!(code, 0);
    let ours = doc["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["namespace"] == NS)
        .cloned();
    assert_eq!(ours.expect("our namespace")["completed"], 1, "{doc}");

    // invalidate: refused without --yes, fenced by --token, then the next call runs.
    let (code, _, err) = idem(s, &["invalidate", &k1]).await;
    assert_eq!(code, 6, "{err}");
    assert!(err.contains("would forget the completed result"), "{err}");
    assert!(
        store.get(&k1).await.unwrap().is_some(),
        "nothing changed without --yes"
    );
    let (code, doc) = idem_json(s, &["invalidate", &k1, "--yes", "--token", "12345"]).await;
    assert_eq!(
        (code, doc["error"]["kind"].as_str()),
        (5, Some("conflict")),
        "{doc}"
    );
    assert!(store.get(&k1).await.unwrap().is_some());
    let (code, doc) = idem_json(s, &["invalidate", &k1, "--yes", "--token", &token]).await;
    assert_eq!(code, 0, "{doc}");
    assert_eq!(doc["done"], "invalidate");
    assert!(
        store.get(&k1).await.unwrap().is_none(),
        "the result is forgotten"
    );
    assert_eq!(create(store, 1, &runs).await.unwrap(), 10);
    assert_eq!(runs.load(Ordering::SeqCst), 2, "the next call ran again");
    assert_eq!(create(store, 1, &runs).await.unwrap(), 10);
    assert_eq!(runs.load(Ordering::SeqCst), 2, "and its result replays");

    // A stuck claim: running, then lapsed; invalidate refuses it (processing).
    let lease = Duration::from_millis(400);
    let claim = store
        .claim(ClaimRequest {
            key: &k2,
            fingerprint: None,
            lease,
        })
        .await
        .unwrap();
    let Claim::Acquired { token: held, .. } = claim else {
        panic!("{claim:?}")
    };
    let (code, doc) = idem_json(s, &["list", "--stuck", "--namespace", NS]).await;
    assert_eq!(
        (code, doc["count"].as_u64()),
        (0, Some(0)),
        "a running claim is not stuck: {doc}"
    );
    let (code, _, err) = idem(s, &["invalidate", NS, "[2]", "--yes"]).await;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("processing"), "{err}");
    tokio::time::sleep(lease + Duration::from_millis(100)).await;
    let (code, doc) = idem_json(s, &["list", "--stuck"]).await;
    assert_eq!(code, 0);
    let stuck: Vec<&Value> = doc["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["key"] == k2.as_str())
        .collect();
    assert_eq!(stuck.len(), 1, "the lapsed claim is listed: {doc}");
    assert_eq!(stuck[0]["status"], "lapsed");
    assert_eq!(stuck[0]["token"], held.get().to_string());
    let (code, out, _) = idem(s, &["list", "--stuck", "--namespace", NS]).await;
    assert_eq!(code, 0);
    assert!(
        out.starts_with("STATUS") && out.contains("lapsed") && out.contains(&k2),
        "{out}"
    );

    // release: the token read is stale once another caller took the claim over.
    let claim = store
        .claim(ClaimRequest {
            key: &k2,
            fingerprint: None,
            lease: Duration::from_secs(60),
        })
        .await
        .unwrap();
    let Claim::Acquired {
        token: taken,
        took_over: true,
    } = claim
    else {
        panic!("{claim:?}")
    };
    let old = held.get().to_string();
    let (code, _, err) = idem(s, &["release", &k2, "--yes", "--token", &old]).await;
    assert_eq!(code, 5, "{err}");
    assert_eq!(
        store.inspect(&k2).await.unwrap().unwrap().token,
        taken,
        "nothing changed"
    );
    let (code, _, err) = idem(s, &["release", &k2]).await;
    assert_eq!(code, 6, "{err}");
    assert!(err.contains("running claim"), "{err}");
    let (code, doc) = idem_json(s, &["release", NS, "[2]", "--yes"]).await;
    assert_eq!(code, 0, "{doc}");
    assert_eq!(doc["done"], "release");
    assert!(store.get(&k2).await.unwrap().is_none());
    let late = store
        .complete(&k2, taken, b"{\"ok\":1}", Duration::from_secs(60))
        .await;
    assert!(
        matches!(late, Err(Error::LeaseLost)),
        "the released holder cannot complete: {late:?}"
    );
    assert_eq!(
        create(store, 2, &runs).await.unwrap(),
        20,
        "the next call runs at once"
    );
    let (code, _, err) = idem(s, &["release", &k2, "--yes"]).await;
    assert_eq!(code, 3, "a completed record is not released: {err}");

    // Steps: a plain release keeps them (the next call resumes), --forget-steps drops them.
    let charged = AtomicU32::new(0);
    assert!(charge(store, 3, &charged, true).await.is_err());
    let (code, doc) = idem_json(s, &["inspect", NS, "[3]"]).await;
    assert_eq!(code, 0);
    assert_eq!(
        (doc["status"].as_str(), doc["steps"].as_u64()),
        (Some("released"), Some(1)),
        "{doc}"
    );
    let (code, _, err) = idem(s, &["release", &k3, "--yes"]).await;
    assert_eq!(code, 3, "already released: {err}");
    assert!(err.contains("--forget-steps"), "{err}");
    assert!(charge(store, 3, &charged, true).await.is_err());
    assert_eq!(
        charged.load(Ordering::SeqCst),
        1,
        "the kept step was resumed, not run again"
    );
    let (code, _, err) = idem(s, &["release", &k3, "--forget-steps"]).await;
    assert_eq!(code, 6, "{err}");
    let (code, doc) = idem_json(s, &["release", &k3, "--forget-steps", "--yes"]).await;
    assert_eq!(code, 0, "{doc}");
    assert_eq!(doc["done"], "forget");
    let after = store.inspect(&k3).await.unwrap();
    assert!(
        after
            .as_ref()
            .is_none_or(|e| e.status == Status::Expired && e.steps == 0),
        "{after:?}"
    );
    assert_eq!(charge(store, 3, &charged, false).await.unwrap(), 3);
    assert_eq!(
        charged.load(Ordering::SeqCst),
        2,
        "after --forget-steps the call starts over"
    );

    // Not found, usage errors.
    let (code, doc) = idem_json(s, &["inspect", NS, "[404]"]).await;
    assert_eq!(
        (code, doc["error"]["kind"].as_str()),
        (1, Some("not_found"))
    );
    let (code, _, _) = idem(s, &["inspect", NS, "not json"]).await;
    assert_eq!(code, 2);
    let (code, _, _) = idem(s, &["inspect", NS]).await;
    assert_eq!(code, 2, "a bare namespace is not a key");
}

/// `purge --expired`: refused without --yes, then an expired record is gone.
async fn purge_scenario(store: &dyn Admin, store_args: &[String]) {
    let s = store_args;
    let k = key(900);
    let claim = store
        .claim(ClaimRequest {
            key: &k,
            fingerprint: None,
            lease: Duration::from_secs(60),
        })
        .await
        .unwrap();
    let Claim::Acquired { token, .. } = claim else {
        panic!("{claim:?}")
    };
    store
        .complete(&k, token, b"{\"ok\":1}", Duration::from_millis(1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        store.inspect(&k).await.unwrap().unwrap().status,
        Status::Expired
    );
    let (code, _, err) = idem(s, &["purge", "--expired"]).await;
    assert_eq!(code, 6, "{err}");
    assert!(store.inspect(&k).await.unwrap().is_some());
    let (code, doc) = idem_json(s, &["purge", "--expired", "--batch", "1", "--yes"]).await;
    assert_eq!(code, 0, "{doc}");
    assert!(doc["purged"].as_u64().unwrap() >= 1, "{doc}");
    assert!(store.inspect(&k).await.unwrap().is_none(), "purged");
    let (code, _, _) = idem(s, &["inspect", &k]).await;
    assert_eq!(code, 1);
}

fn args(url: &str, extra: &[&str]) -> Vec<String> {
    let mut all = vec!["--store".to_owned(), url.to_owned()];
    all.extend(extra.iter().map(|s| s.to_string()));
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite() {
    let dir = std::env::temp_dir().join(support::unique("idem_cli"));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}", dir.join("records.db").display());
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .connect_with(
            sqlx::sqlite::SqliteConnectOptions::new()
                .filename(dir.join("records.db"))
                .create_if_missing(true),
        )
        .await
        .unwrap();
    let store = SqliteStore::with_table(pool.clone(), "orders_idem").unwrap();
    store.migrate().await.unwrap();
    let s = args(&url, &["--table", "orders_idem"]);
    scenario(&store, &s).await;
    purge_scenario(&store, &s).await;

    // A record it cannot read: a fingerprint of 2 bytes.
    let corrupt = key(500);
    sqlx::query("INSERT INTO orders_idem (key, state, token, fingerprint, outcome, expires_at, created_at, updated_at) VALUES (?1, 'completed', 1, x'0102', '{}', 99999999999999, 0, 0)")
        .bind(&corrupt)
        .execute(&pool)
        .await
        .unwrap();
    corrupt_scenario(&s, &corrupt).await;
    // More a foreign writer could leave: kept steps that are not JSON; a
    // lapsed claim (never "stuck") and a TEXT value as fingerprints; a time
    // that is not an integer; a key that is not UTF-8.
    let digest = "0".repeat(64);
    for insert in [
        format!("INSERT INTO orders_idem (key, state, token, expires_at, created_at, updated_at, steps, steps_until) VALUES ('{}', 'released', 2, 0, 0, 0, '[{{not json', 99999999999999)", key(501)),
        format!("INSERT INTO orders_idem (key, state, token, fingerprint, expires_at, created_at, updated_at) VALUES ('{}', 'processing', 3, x'0102', 0, 0, 0)", key(502)),
        format!("INSERT INTO orders_idem (key, state, token, fingerprint, outcome, expires_at, created_at, updated_at) VALUES ('{}', 'completed', 4, '{}', '{{}}', 99999999999999, 0, 0)", key(503), "\u{e9}".repeat(16)),
        format!("INSERT INTO orders_idem (key, state, token, outcome, expires_at, created_at, updated_at) VALUES ('{}', 'completed', 5, '{{}}', 99999999999999.5, 0, 0)", key(504)),
        format!("INSERT INTO orders_idem (key, state, token, outcome, expires_at, created_at, updated_at) VALUES (CAST(x'ff' AS TEXT) || ':{digest}', 'completed', 6, '{{}}', 99999999999999, 0, 0)"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(insert)).execute(&pool).await.unwrap();
    }
    corrupt_listed(
        &s,
        &[
            "steps are not JSON",
            "fingerprint",
            "not an integer",
            "not UTF-8",
        ],
        6,
    )
    .await;

    // A database that does not exist is not created.
    let missing = format!("sqlite://{}", dir.join("typo.db").display());
    let (code, _, err) = idem(&args(&missing, &[]), &["stats"]).await;
    assert_eq!(code, 4, "{err}");
    assert!(!dir.join("typo.db").exists());
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres() {
    let (store, pool, table) = support::pg_table("cli").await;
    let s = args(&support::pg_url(), &["--table", &table]);
    scenario(&store, &s).await;
    purge_scenario(&store, &s).await;
    // A record it cannot read: a fingerprint of 2 bytes.
    let corrupt = key(500);
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {table} (key, state, token, fingerprint, outcome, expires_at) VALUES ($1, 'completed', 1, '\\x0102', '{{}}', now() + interval '1 day')"
    )))
    .bind(&corrupt)
    .execute(&pool)
    .await
    .unwrap();
    corrupt_scenario(&s, &corrupt).await;
    // A lapsed claim with a bad fingerprint (never "stuck"); an infinite time.
    for insert in [
        format!("INSERT INTO {table} (key, state, token, fingerprint, expires_at) VALUES ('{}', 'processing', 2, '\\x0102', now() - interval '1 hour')", key(502)),
        format!("INSERT INTO {table} (key, state, token, outcome, expires_at) VALUES ('{}', 'completed', 3, '{{}}', 'infinity')", key(503)),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(insert)).execute(&pool).await.unwrap();
    }
    corrupt_listed(&s, &["fingerprint", "infinite"], 3).await;
    support::drop_pg_table(&pool, &table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis() {
    let prefix = format!("{}:", support::unique("idem_cli"));
    let store = RedisStore::connect(&support::redis_url())
        .await
        .unwrap()
        .with_prefix(&prefix);
    let s = args(&support::redis_url(), &["--prefix", &prefix]);
    scenario(&store, &s).await;

    // A corrupt record is a store error (exit 4) that says so.
    let corrupt = key(500);
    let client = redis::Client::open(support::redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("SET")
        .arg(format!("{prefix}{corrupt}"))
        .arg("not a record")
        .query_async(&mut conn)
        .await
        .unwrap();
    corrupt_scenario(&s, &corrupt).await;
    // A key that is not UTF-8 under the prefix: reported, not skipped.
    let mut foreign = format!("{prefix}{NS}:").into_bytes();
    foreign.push(0xff);
    let _: () = redis::cmd("SET")
        .arg(foreign)
        .arg("x")
        .query_async(&mut conn)
        .await
        .unwrap();
    corrupt_listed(&s, &["not UTF-8", "corrupt"], 2).await;
    let (code, doc) = idem_json(&s, &["purge", "--expired", "--yes"]).await;
    assert_eq!(
        (code, doc["purged"].as_u64()),
        (0, Some(0)),
        "Redis expires its own: {doc}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster() {
    let prefix = format!("{}:", support::unique("idem_cli"));
    let store = RedisStore::connect_cluster(&support::cluster_nodes())
        .await
        .expect("the test cluster: ./scripts/redis-cluster.sh start")
        .with_prefix(&prefix);
    let s = args(&support::cluster_url(), &["--prefix", &prefix]);
    scenario(&store, &s).await;
    // Records on every master are counted: 3 keys in at least 2 slots' masters.
    let (code, doc) = idem_json(&s, &["stats"]).await;
    assert_eq!(code, 0);
    assert_eq!(doc["total"]["records"], 3, "{doc}");
}

#[tokio::test]
async fn failures_have_their_exit_codes() {
    let (code, _, err) = idem(&[], &["stats"]).await;
    assert_eq!(code, 2, "no store: {err}");
    let (code, _, _) = idem(&[], &["frobnicate"]).await;
    assert_eq!(code, 2);
    for down in [
        "redis://127.0.0.1:1",
        "postgres://postgres@127.0.0.1:1/test",
        "redis-cluster://127.0.0.1:1",
    ] {
        let (code, doc) = idem_json(&args(down, &[]), &["stats"]).await;
        assert_eq!(
            (code, doc["error"]["kind"].as_str()),
            (4, Some("store")),
            "{down}: {doc}"
        );
    }
    let (code, _, _) = idem(&args("mysql://x", &[]), &["stats"]).await;
    assert_eq!(code, 2, "an unknown scheme");
    let (code, _, _) = idem(&args(&support::redis_url(), &["--table", "t"]), &["stats"]).await;
    assert_eq!(code, 2, "--table on Redis");
    let (code, out, _) = idem(&[], &["--help"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("Exit codes"), "{out}");
}

#[tokio::test]
async fn in_process_on_a_memory_store() {
    let store = idem_runtime::MemoryStore::new();
    let runs = AtomicU32::new(0);
    create(&store, 7, &runs).await.unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let exit = idem_cli::run_on(
        &store,
        ["idem", "invalidate", NS, "[7]", "--yes", "--json"],
        &mut out,
        &mut err,
    )
    .await;
    assert_eq!(
        exit,
        idem_cli::Exit::Ok,
        "{}",
        String::from_utf8_lossy(&err)
    );
    let doc: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(doc["done"], "invalidate");
    create(&store, 7, &runs).await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// A mistyped `--table` is an error, as a mistyped SQLite path is: the CLI
/// does not create the table (nor its sequence), and does not report the
/// empty new table as "no records" (exit 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_that_does_not_exist_is_not_created() {
    // PostgreSQL.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&support::pg_url())
        .await
        .unwrap();
    let typo = support::unique("no_such_table");
    let s = args(&support::pg_url(), &["--table", &typo]);
    for command in [
        &["stats"][..],
        &["list", "--stuck"],
        &["inspect", NS, "[1]"],
    ] {
        let (code, _, err) = idem(&s, command).await;
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(&typo)
            .fetch_one(&pool)
            .await
            .unwrap();
        if exists {
            let drop = format!("DROP TABLE {typo}; DROP SEQUENCE IF EXISTS {typo}_token_seq");
            sqlx::raw_sql(sqlx::AssertSqlSafe(drop))
                .execute(&pool)
                .await
                .unwrap();
        }
        assert!(!exists, "{command:?} created the table {typo}");
        assert!(
            code == 2 || code == 4,
            "{command:?} on a missing table: exit {code}, {err}"
        );
    }

    // SQLite: the file exists, the table does not.
    let dir = std::env::temp_dir().join(support::unique("idem_cli_typo"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("records.db");
    let store = SqliteStore::connect(&format!("sqlite://{}", file.display()))
        .await
        .unwrap();
    drop(store);
    let s = args(
        &format!("sqlite://{}", file.display()),
        &["--table", "orders_idm"],
    );
    let (code, _, err) = idem(&s, &["stats"]).await;
    let lite = sqlx::sqlite::SqlitePoolOptions::new()
        .connect(&format!("sqlite://{}", file.display()))
        .await
        .unwrap();
    let tables: i64 =
        sqlx::query_scalar("SELECT count(*) FROM sqlite_master WHERE name = 'orders_idm'")
            .fetch_one(&lite)
            .await
            .unwrap();
    assert_eq!(tables, 0, "stats created the table orders_idm");
    assert!(
        code == 2 || code == 4,
        "stats on a missing table: exit {code}, {err}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Redis: a prefix and a namespace holding glob characters (`*`, `?`, `[`,
/// `]`, `\`) are matched literally by `list` and `stats`, on one server and on
/// every master of a cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn glob_characters_in_prefixes_and_namespaces_are_literal() {
    for cluster in [false, true] {
        let prefix = format!("{}[*?]\\:", support::unique("idem_glob"));
        let open = |prefix: String| async move {
            if cluster {
                RedisStore::connect_cluster(&support::cluster_nodes()).await
            } else {
                RedisStore::connect(&support::redis_url()).await
            }
            .unwrap()
            .with_prefix(&prefix)
        };
        let store = open(prefix.clone()).await;
        // A sibling prefix the glob would match if `*`/`?`/`[..]` were live.
        let sibling = open(prefix.replace("[*?]", "[*?]x")).await;
        let ns = "<[u8] as m::T*>::f?";
        for i in 0..12u64 {
            let key = KeyBuilder::new(ns).part(&i).finish().unwrap();
            for s in [&store, &sibling] {
                s.claim(ClaimRequest {
                    key: key.as_str(),
                    fingerprint: None,
                    lease: Duration::from_secs(60),
                })
                .await
                .unwrap();
            }
        }
        let url = if cluster {
            support::cluster_url()
        } else {
            support::redis_url()
        };
        let s = args(&url, &["--prefix", &prefix]);
        let (code, doc) = idem_json(&s, &["list", "--namespace", ns]).await;
        assert_eq!(
            (code, doc["count"].as_u64()),
            (0, Some(12)),
            "cluster {cluster}: {doc}"
        );
        let (code, doc) = idem_json(&s, &["stats"]).await;
        assert_eq!(code, 0);
        assert_eq!(doc["total"]["records"], 12, "cluster {cluster}: {doc}");
        assert_eq!(
            doc["namespaces"][0]["namespace"], ns,
            "cluster {cluster}: {doc}"
        );
    }
}

/// A transaction holding `key`'s row in `table` (as a running `tx =` call
/// does) until it commits.
async fn hold_row(
    pool: &sqlx::PgPool,
    table: &str,
    key: &str,
) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut holder = pool.begin().await.unwrap();
    let lock = format!("SELECT 1 FROM {table} WHERE key = $1 FOR UPDATE");
    sqlx::query(sqlx::AssertSqlSafe(lock))
        .bind(key.to_owned())
        .fetch_one(&mut *holder)
        .await
        .unwrap();
    holder
}

/// A record whose row another transaction holds (a running `tx =` call, a
/// stuck session): the CLI's fenced write gives up after its lock timeout
/// with a store error (exit 4), changing nothing, instead of hanging; once
/// the row is let go, the same command goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_row_is_a_store_error_not_a_hang() {
    let (store, pool, table) = support::pg_table("cli_locked").await;
    let runs = AtomicU32::new(0);
    create(&store, 77, &runs).await.unwrap();
    let s = args(&support::pg_url(), &["--table", &table]);
    let holder = hold_row(&pool, &table, &key(77)).await;
    let started = std::time::Instant::now();
    let (code, out, err) = idem(&s, &["invalidate", &key(77), "--yes"]).await;
    assert_eq!(code, 4, "{out} {err}");
    assert!(err.contains("lock"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    holder.commit().await.unwrap();
    assert_eq!(create(&store, 77, &runs).await.unwrap(), 770);
    assert_eq!(runs.load(Ordering::SeqCst), 1, "nothing changed: a replay");
    let (code, out, err) = idem(&s, &["invalidate", &key(77), "--yes"]).await;
    assert_eq!(code, 0, "{out} {err}");
    create(&store, 77, &runs).await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 2, "invalidated: it runs again");
    support::drop_pg_table(&pool, &table).await;
}

/// `--lock-timeout` reaches the CLI's PostgreSQL sessions: with a long one,
/// a command outwaits the default 5 s for a held row and succeeds once it is
/// free; a bad duration, or the flag on another store, is a usage error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lock_timeout_is_the_operators_to_set() {
    let (store, pool, table) = support::pg_table("cli_lock_timeout").await;
    let runs = AtomicU32::new(0);
    create(&store, 78, &runs).await.unwrap();
    let s = args(&support::pg_url(), &["--table", &table]);
    let holder = hold_row(&pool, &table, &key(78)).await;
    let mut all = s.clone();
    all.extend(["--lock-timeout", "10m", "invalidate", &key(78), "--yes"].map(String::from));
    let waiter = tokio::spawn(async move {
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        idem(&[], &all).await
    });
    // Its statement is waiting for the row: then past the default limit.
    let waiting = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%{table}%'"
    );
    loop {
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(waiting.clone()))
            .fetch_one(&pool)
            .await
            .unwrap();
        if n > 0 {
            break;
        }
        assert!(!waiter.is_finished(), "{:?}", waiter.await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(!waiter.is_finished(), "gave up: {:?}", waiter.await);
    holder.commit().await.unwrap();
    let (code, out, err) = waiter.await.unwrap();
    assert_eq!(code, 0, "{out} {err}");
    create(&store, 78, &runs).await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 2, "invalidated: it ran again");

    // No limit; beyond PostgreSQL's limit; not a duration.
    let (code, _, err) = idem(&s, &["--lock-timeout", "0s", "stats"]).await;
    assert_eq!(code, 0, "{err}");
    for bad in ["30d", "soon"] {
        let (code, _, err) = idem(&s, &["--lock-timeout", bad, "stats"]).await;
        assert_eq!(code, 2, "{bad}: {err}");
        assert!(err.contains("--lock-timeout"), "{err}");
    }
    let redis = args(&support::redis_url(), &[]);
    let (code, _, err) = idem(&redis, &["--lock-timeout", "1s", "stats"]).await;
    assert_eq!(code, 2, "{err}");
    support::drop_pg_table(&pool, &table).await;
}

/// `--json` promises one JSON document, usage errors included.
#[tokio::test]
async fn usage_errors_are_one_json_document_with_json() {
    let (code, doc) = idem_json(&[], &["inspect", "--no-such-flag"]).await;
    assert_eq!(code, 2);
    assert_eq!(doc["error"]["kind"], "usage", "{doc}");
    assert!(
        doc["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--no-such-flag"),
        "{doc}"
    );
    // A missing argument is named (clap names it on a line of its own).
    let (code, doc) = idem_json(&[], &["purge"]).await;
    assert_eq!(code, 2);
    let message = doc["error"]["message"].as_str().unwrap();
    assert!(message.contains("--expired"), "{doc}");
}
