//! Redis faults: a server that stops mid-run fails calls closed (`Error::Store`,
//! bodies not run) and work resumes when it is back, with nothing run twice; a
//! record that vanishes while its body runs refuses the completion; a flushed
//! script cache is reloaded transparently.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use idem_runtime::{idempotent, Error, RedisStore, Store};
use idem_tests::{redis_url, unique};

/// A private redis-server with an append-only file (fsync on every write), as
/// a payment service should run it; or a replica of another.
pub(crate) struct Server {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
    replica_of: Option<u16>,
}

impl Server {
    pub(crate) fn start() -> Server {
        Server::new(None)
    }

    /// A replica of `master`, linked and synced when this returns.
    pub(crate) fn replica_of(master: &Server) -> Server {
        let server = Server::new(Some(master.port));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !server.info("replication").contains("master_link_status:up") {
            assert!(Instant::now() < deadline, "the replica did not sync");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    fn new(replica_of: Option<u16>) -> Server {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(unique("redis-faults"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut server = Server {
            port,
            dir,
            child: None,
            replica_of,
        };
        server.up();
        server
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn up(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .args(["--maxmemory-policy", "noeviction"])
            .args(self.replica_of.iter().flat_map(|master| {
                [
                    "--replicaof".to_owned(),
                    "127.0.0.1".to_owned(),
                    master.to_string(),
                ]
            }))
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A section of `INFO`, through `redis-cli`.
    pub(crate) fn info(&self, section: &str) -> String {
        self.cli(&["INFO", section])
    }

    /// Runs `redis-cli` against this server; returns its output.
    pub(crate) fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Sends `signal` (`-STOP`, `-CONT`) to the server process.
    pub(crate) fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        assert!(Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap()
            .success());
    }

    /// Resumes this replica (stopped with `-STOP`) and returns once it has
    /// read everything `master` had written: a test that then expects the
    /// replica to acknowledge within a short `WAIT` does not race the
    /// backlog (megabytes of filler on a busy machine).
    pub(crate) fn resume_caught_up(&self, master: &Server) {
        self.signal("-CONT");
        let offset = |info: String, field: &str| -> u64 {
            info.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        let target = offset(master.info("replication"), "master_repl_offset:");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while offset(self.info("replication"), "slave_repl_offset:") < target {
            assert!(
                std::time::Instant::now() < deadline,
                "the replica did not catch up"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// SIGKILL: no shutdown, no final save; only the append-only file remains.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The error type of the tests' idempotent functions.
#[derive(Debug)]
pub(crate) enum AppError {
    Idem(Error),
}

impl From<Error> for AppError {
    fn from(e: Error) -> Self {
        AppError::Idem(e)
    }
}

struct Payments {
    store: RedisStore,
    runs: AtomicUsize,
}

impl Payments {
    #[idempotent(key = id, name = "redis-faults", store = self.store)]
    async fn pay(&self, id: u32) -> Result<u32, AppError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        Ok(id * 10)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stops_fails_closed_and_work_resumes_when_it_is_back() {
    let mut server = Server::start();
    let svc = Payments {
        store: RedisStore::connect(&server.url()).await.unwrap(),
        runs: AtomicUsize::new(0),
    };
    for id in 0..10 {
        assert_eq!(svc.pay(id).await.unwrap(), id * 10);
    }
    assert_eq!(svc.runs.load(Ordering::SeqCst), 10);

    server.kill();
    for id in [0, 10, 11] {
        let result = svc.pay(id).await;
        assert!(
            matches!(result, Err(AppError::Idem(Error::Store(_)))),
            "while Redis is down: {result:?}"
        );
    }
    assert_eq!(
        svc.runs.load(Ordering::SeqCst),
        10,
        "no body ran while Redis was down"
    );

    server.up();
    // The connection comes back on its own; the first calls may still see it reconnecting.
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        match svc.pay(0).await {
            Ok(v) => break v,
            Err(e) => {
                assert!(Instant::now() < deadline, "Redis never came back: {e:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(first, 0, "replayed from the append-only file");
    for id in 0..12 {
        assert_eq!(svc.pay(id).await.unwrap(), id * 10);
    }
    assert_eq!(
        svc.runs.load(Ordering::SeqCst),
        12,
        "the 10 from before replayed; only the 2 new ones ran, once each"
    );

    // A flushed script cache (a restart without the scripts, a failover) is reloaded.
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(svc.pay(12).await.unwrap(), 120);
    assert_eq!(svc.pay(12).await.unwrap(), 120);
}

struct Vanishing {
    store: RedisStore,
    runs: AtomicUsize,
}

impl Vanishing {
    /// Deletes its own record while running, as eviction or expiry would.
    #[idempotent(key = id, name = "redis-vanish", store = self.store)]
    async fn run(&self, id: String) -> Result<usize, AppError> {
        let key = idem_runtime::Key::derive("redis-vanish", &id).unwrap();
        let client = redis::Client::open(redis_url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let _: i64 = redis::cmd("DEL")
            .arg(self.store.redis_key(key.as_str()))
            .query_async(&mut conn)
            .await
            .unwrap();
        Ok(self.runs.fetch_add(1, Ordering::SeqCst) + 1)
    }
}

#[tokio::test]
async fn a_record_that_vanishes_while_its_body_runs_refuses_the_completion() {
    let svc = Vanishing {
        store: RedisStore::connect(&redis_url())
            .await
            .unwrap()
            .with_prefix("idem-vanish:"),
        runs: AtomicUsize::new(0),
    };
    let id = unique("vanish");
    let result = svc.run(id.clone()).await;
    assert!(
        matches!(result, Err(AppError::Idem(Error::LeaseLost))),
        "{result:?}"
    );
    let key = idem_runtime::Key::derive("redis-vanish", &id).unwrap();
    assert!(
        svc.store.get(key.as_str()).await.unwrap().is_none(),
        "no result was written for a claim nobody holds"
    );
}

struct Plain {
    store: RedisStore,
    runs: AtomicUsize,
}

impl Plain {
    #[idempotent(key = id, name = "redis-corrupt", store = self.store)]
    async fn run(&self, id: String) -> Result<usize, AppError> {
        Ok(self.runs.fetch_add(1, Ordering::SeqCst) + 1)
    }
}

/// A record that is not what idem wrote — another type under the key, a
/// header too short, a deadline or token that is not decimal digits, a state
/// idem never writes, a damaged fingerprint — is `Error::Codec`, as on the SQL
/// stores, from the claim and from `get`; the body never runs.
#[tokio::test]
async fn corrupt_records_are_codec_errors_and_never_rerun() {
    let svc = Plain {
        store: RedisStore::connect(&redis_url())
            .await
            .unwrap()
            .with_prefix("idem-corrupt:"),
        runs: AtomicUsize::new(0),
    };
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    // The layout (docs in idem-runtime/src/store/redis.rs): state, replica
    // count, touch byte, 20 token digits, 15 deadline digits, fingerprint flag.
    let record = |state: &str, token: &str, deadline: &str, rest: &[u8]| -> Vec<u8> {
        let mut v = format!("{state}\0\0{token:>20}{deadline:>15}").into_bytes();
        v.extend_from_slice(rest);
        v
    };
    let token = "00000000000000000005";
    let far = "999999999999999";
    let zero = "000000000000000";
    let cases: Vec<(&str, Option<Vec<u8>>)> = vec![
        ("a hash", None),
        ("not a record", Some(b"not a record".to_vec())),
        (
            "a short completed record",
            Some(b"c\x00\x000000000005".to_vec()),
        ),
        // Found by the break-it review of issue 10: Lua's `tonumber` reads
        // these deadlines as numbers, and strange states with a past deadline
        // were taken over.
        ("a nan deadline", Some(record("p", token, "nan", b"-"))),
        ("an inf deadline", Some(record("p", token, "inf", b"-"))),
        (
            "a hex deadline",
            Some(record("p", token, "0x7fffffff", b"-")),
        ),
        ("a negative deadline", Some(record("p", token, "-5", b"-"))),
        (
            "a strange state, past",
            Some(record("x", token, "000000000000001", b"-")),
        ),
        ("a strange state", Some(record("x", token, far, b"-"))),
        (
            "completed, token not digits",
            Some(record("c", "five", zero, b"-1")),
        ),
        (
            "processing, token not digits",
            Some(record("p", "five", far, b"-")),
        ),
        ("a fingerprint flag", Some(record("c", token, zero, b"z1"))),
        (
            "a short fingerprint",
            Some(record("c", token, zero, b"f0123")),
        ),
        (
            "processing, bytes after the header",
            Some(record("p", token, far, b"-junk")),
        ),
        (
            "released, bytes after the header",
            Some(record("r", token, zero, b"-junk")),
        ),
    ];
    for (what, value) in cases {
        let id = unique("corrupt");
        let key = idem_runtime::Key::derive("redis-corrupt", &id).unwrap();
        let redis_key = svc.store.redis_key(key.as_str());
        match value {
            Some(value) => {
                let _: () = redis::cmd("SET")
                    .arg(&redis_key)
                    .arg(value)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
            }
            None => {
                let _: () = redis::cmd("HSET")
                    .arg(&redis_key)
                    .arg(&["s", "c", "t", "5", "o", "1", "e", far])
                    .query_async(&mut conn)
                    .await
                    .unwrap();
            }
        }
        let _: () = redis::cmd("PEXPIRE")
            .arg(&redis_key)
            .arg(600_000)
            .query_async(&mut conn)
            .await
            .unwrap();
        let result = svc.run(id.clone()).await;
        assert!(
            matches!(result, Err(AppError::Idem(Error::Codec(_)))),
            "{what}: {result:?}"
        );
        let read = svc.store.get(key.as_str()).await;
        assert!(matches!(read, Err(Error::Codec(_))), "{what}: {read:?}");
    }
    assert_eq!(svc.runs.load(Ordering::SeqCst), 0, "no body ran");
}
