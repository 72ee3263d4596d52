//! Steps through `#[idempotent]` on the real stores: an attempt that fails,
//! is cancelled or panics after each step, or whose process is killed
//! (SIGKILL) between two steps, is followed by one that replays the recorded
//! steps and runs the rest, each step's effect made once. (The conformance
//! suite checks the store calls; the attribute tests the engine on memory.)

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem_runtime::{current, idempotent, step, PostgresStore, RedisStore, SqliteStore, Store};
use idem_tests::{postgres_url, redis_url, unique};

#[derive(Debug)]
enum AppError {
    Idem(idem_runtime::Error),
    Down,
}

impl From<idem_runtime::Error> for AppError {
    fn from(e: idem_runtime::Error) -> Self {
        AppError::Idem(e)
    }
}

const STEPS: [&str; 4] = ["reserve", "charge", "ship", "mail"];

#[derive(Clone, Copy, Debug)]
enum Fault {
    Fail,
    Hang,
    Panic,
}

struct Flow {
    store: Arc<dyn Store>,
    effects: Mutex<BTreeMap<&'static str, usize>>,
    fault: Mutex<Option<(&'static str, Fault)>>,
    took_over: Mutex<Vec<bool>>,
    /// Told when an attempt reaches the step where it hangs.
    hung: tokio::sync::Notify,
}

impl Flow {
    #[idempotent(key = order, name = "store-steps", lease = "1h", ttl = "1h", store = self.store)]
    async fn run(self: Arc<Self>, order: String) -> Result<String, AppError> {
        self.took_over
            .lock()
            .unwrap()
            .push(current().unwrap().took_over());
        let mut done = Vec::new();
        for name in STEPS {
            let this = Arc::clone(&self);
            done.push(step(name, async move { this.effect(name).await }).await?);
        }
        Ok(done.join("/"))
    }

    async fn effect(&self, name: &'static str) -> Result<String, AppError> {
        let fault = {
            let mut fault = self.fault.lock().unwrap();
            match *fault {
                Some((at, what)) if at == name => fault.take().map(|_| what),
                _ => None,
            }
        };
        match fault {
            Some(Fault::Fail) => return Err(AppError::Down),
            Some(Fault::Hang) => {
                self.hung.notify_one();
                std::future::pending::<()>().await
            }
            Some(Fault::Panic) => panic!("{name} panicked (on purpose)"),
            None => {}
        }
        let mut effects = self.effects.lock().unwrap();
        let n = effects.entry(name).or_default();
        *n += 1;
        Ok(format!("{name}-{n}"))
    }
}

async fn resumes_after_every_step(store: Arc<dyn Store>) {
    for fault in [Fault::Fail, Fault::Hang, Fault::Panic] {
        for (i, at) in STEPS.into_iter().enumerate() {
            let flow = Arc::new(Flow {
                store: Arc::clone(&store),
                effects: Mutex::default(),
                fault: Mutex::new(Some((at, fault))),
                took_over: Mutex::default(),
                hung: tokio::sync::Notify::new(),
            });
            let order = unique("steps");
            let first = tokio::spawn(Arc::clone(&flow).run(order.clone()));
            match fault {
                Fault::Fail => assert!(matches!(first.await.unwrap(), Err(AppError::Down))),
                Fault::Panic => assert!(first.await.unwrap_err().is_panic()),
                Fault::Hang => {
                    // Cancelled once it hangs in step `at` (the ones before are recorded).
                    flow.hung.notified().await;
                    first.abort();
                    assert!(first.await.unwrap_err().is_cancelled());
                }
            }
            // The release of a dropped claim runs in a task of its own: a
            // retry that meets the claim first waits for it (lease 1 h: only
            // the release can end it).
            let second = loop {
                match Arc::clone(&flow).run(order.clone()).await {
                    Err(AppError::Idem(idem_runtime::Error::InProgress { .. })) => {
                        tokio::time::sleep(Duration::from_millis(10)).await
                    }
                    other => break other,
                }
            };
            let expected = STEPS.map(|s| format!("{s}-1")).join("/");
            assert_eq!(second.unwrap(), expected, "{fault:?} at {at}");
            for name in STEPS {
                assert_eq!(
                    flow.effects.lock().unwrap()[name],
                    1,
                    "{fault:?} at {at}: {name}"
                );
            }
            assert_eq!(
                flow.took_over.lock().unwrap().last(),
                Some(&(i > 0)),
                "{fault:?} at {at}: the retry knows it resumed recorded steps"
            );
            assert_eq!(Arc::clone(&flow).run(order).await.unwrap(), expected);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_resumes_after_every_step() {
    let dir = std::env::temp_dir().join(unique("idem-steps"));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}/records.db", dir.display());
    resumes_after_every_step(Arc::new(SqliteStore::connect(&url).await.unwrap())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_resumes_after_every_step() {
    resumes_after_every_step(Arc::new(
        PostgresStore::connect(&postgres_url()).await.unwrap(),
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_resumes_after_every_step() {
    resumes_after_every_step(Arc::new(RedisStore::connect(&redis_url()).await.unwrap())).await;
}

/// For each pair of adjacent steps: a worker process runs the checkout and is
/// killed between the two; the retry here waits out the dead holder's lease,
/// replays the steps it recorded (their values name the dead process) and runs
/// the rest. Every effect is made once, and every later call replays.
async fn killed_between_steps(kind: &str, url: &str, store: Arc<dyn Store>) {
    use idem_tests::steps::{Flow, STEPS};
    use std::io::{BufRead as _, BufReader};
    for stop_after in 0..STEPS.len() - 1 {
        let key = unique("kill-steps");
        let effects = std::env::temp_dir().join(format!("{key}.effects"));
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_idem-test-worker"))
            .args([
                "steps",
                kind,
                url,
                effects.to_str().unwrap(),
                &key,
                &stop_after.to_string(),
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("worker");
        let worker = child.id();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "{kind}: the worker said {line:?}");
        child.kill().expect("SIGKILL");
        child.wait().unwrap();

        let flow = Flow {
            store: Arc::clone(&store),
            effects: effects.clone(),
            stop_after: None,
        };
        let out = flow.run(key.clone()).await.unwrap();
        let me = std::process::id();
        let expected: Vec<String> = STEPS
            .iter()
            .enumerate()
            .map(|(i, s)| format!("{s}@{}", if i <= stop_after { worker } else { me }))
            .collect();
        assert_eq!(
            out,
            expected.join("/"),
            "{kind}, killed after step {stop_after}"
        );
        let made = std::fs::read_to_string(&effects).unwrap();
        for name in STEPS {
            let times = made
                .lines()
                .filter(|l| *l == format!("{name} {key}"))
                .count();
            assert_eq!(
                times, 1,
                "{kind}, killed after step {stop_after}: {name} made {times} times"
            );
        }
        assert_eq!(flow.run(key).await.unwrap(), out, "a later call replays");
        std::fs::remove_file(effects).ok();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_process_killed_between_steps() {
    let dir = std::env::temp_dir().join(unique("idem-kill-steps"));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}/records.db", dir.display());
    let store = Arc::new(SqliteStore::connect(&url).await.unwrap());
    killed_between_steps("sqlite", &url, store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_process_killed_between_steps() {
    let url = postgres_url();
    let store = Arc::new(PostgresStore::connect(&url).await.unwrap());
    killed_between_steps("postgres", &url, store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_process_killed_between_steps() {
    let url = redis_url();
    let store = Arc::new(RedisStore::connect(&url).await.unwrap());
    killed_between_steps("redis", &url, store).await;
}
