//! `idem-chaos run`: one run. It sets the store up, starts the service and
//! client processes, lets the nemesis loose for a while, heals everything,
//! replays every operation once, counts the effects and hands the history to
//! the checker. Everything it records lands in the run's directory:
//! `client-*.jsonl`, `executions-*.jsonl`, `faults.jsonl`, `verify.jsonl`,
//! `report.json` and `latency.svg`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::check::{self, Report};
use crate::client::{self, Workload};
use crate::history::{self, now_us, Execution, Fault, Phase, Request};
use crate::nemesis::{self, Action, Kind};
use crate::proxy::{Faults, Proxy};
use crate::rng::Rng;
use crate::service::Mode;
use crate::stores::{self, Spec};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The lease the services' `#[idempotent]` calls hold (`lease = "2s"`).
pub const LEASE: Duration = Duration::from_secs(2);

/// Which store a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// `MemoryStore`, one per service process.
    Memory,
    /// One SQLite file shared by the service processes.
    Sqlite,
    /// The machine's PostgreSQL, through the proxy.
    Postgres,
    /// A Redis server of the run's own (append-only file, fsync always), through the proxy.
    Redis,
    /// A local Redis Cluster with a replica per master (`scripts/redis-cluster.sh`,
    /// ports 7201–7206).
    Cluster,
}

impl StoreKind {
    /// Parses the names `name` gives.
    pub fn parse(s: &str) -> Option<StoreKind> {
        Some(match s {
            "memory" => StoreKind::Memory,
            "sqlite" => StoreKind::Sqlite,
            "postgres" => StoreKind::Postgres,
            "redis" => StoreKind::Redis,
            "cluster" => StoreKind::Cluster,
            _ => return None,
        })
    }

    /// The store's name on the command line and in tables.
    pub fn name(self) -> &'static str {
        match self {
            StoreKind::Memory => "memory",
            StoreKind::Sqlite => "sqlite",
            StoreKind::Postgres => "postgres",
            StoreKind::Redis => "redis",
            StoreKind::Cluster => "cluster",
        }
    }

    /// The faults that make sense against this store.
    pub fn faults(self) -> &'static [Kind] {
        match self {
            StoreKind::Memory | StoreKind::Sqlite => &[Kind::Kill, Kind::Pause],
            StoreKind::Cluster => &[Kind::Kill, Kind::Pause, Kind::Failover],
            StoreKind::Postgres | StoreKind::Redis => {
                &[Kind::Kill, Kind::Pause, Kind::Net, Kind::Restart]
            }
        }
    }
}

/// One run's settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    /// The store.
    pub store: StoreKind,
    /// How the body makes its effect.
    pub mode: Mode,
    /// The faults.
    pub fault: Kind,
    /// The seed of the schedule and of every choice.
    pub seed: u64,
    /// Service processes.
    pub services: usize,
    /// Client processes.
    pub clients: usize,
    /// Operations per client.
    pub ops: usize,
    /// Operations in flight per client.
    pub concurrency: usize,
    /// How long the workload and the nemesis run.
    pub duration: Duration,
    /// The body's work, before and after the effect, at most this long each.
    pub work: Duration,
    /// The run's directory.
    pub out: PathBuf,
    /// The binary the services run (another build, for the mutation run).
    pub service_bin: PathBuf,
    /// The one violation kind this run must show (a mutation run), if any.
    pub expect: Option<String>,
    /// Redis: replicas that must acknowledge each completion (0: none).
    #[serde(default)]
    pub replica_ack: u32,
}

/// A violation the run may show because the setting cannot prevent it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Limit {
    /// The violation kind.
    pub kind: String,
    /// Why it cannot hold, and what prevents it.
    pub why: String,
}

/// The violations `config` cannot prevent (docs: RELIABILITY.md, "Limits").
pub fn limits(config: &Config) -> Vec<Limit> {
    let mut out = Vec::new();
    let faulty = config.fault != Kind::None;
    if config.store == StoreKind::Memory && matches!(config.fault, Kind::Kill | Kind::Mix) {
        let why = "a memory store's records live in the service process and die with it";
        for kind in ["duplicate effect", "response differs", "lost"] {
            out.push(Limit {
                kind: kind.into(),
                why: why.into(),
            });
        }
    }
    if config.fault == Kind::Skew && config.store == StoreKind::Sqlite {
        let why = "SQLite is embedded: each process judges leases by its own clock, so a \
                   process whose clock runs ahead takes over live claims (processes on one \
                   host share one clock, so this needs a clock set wrong)";
        for kind in ["duplicate effect", "response differs"] {
            out.push(Limit {
                kind: kind.into(),
                why: why.into(),
            });
        }
    }
    if config.fault == Kind::LossyFailover && config.replica_ack == 0 {
        let why = "Redis replicates asynchronously: a completion the master acknowledged \
                   but never sent to its replica is gone once the replica takes over, and the \
                   call runs again (wait for replica acknowledgement before answering)";
        for kind in ["response differs", "lost"] {
            out.push(Limit {
                kind: kind.into(),
                why: why.into(),
            });
        }
    }
    if config.mode == Mode::Plain && faulty {
        out.push(Limit {
            kind: "duplicate effect".into(),
            why: "an effect outside the store runs again when its holder loses the claim \
                  (killed after the effect, or paused or cut off past its lease); \
                  make it with tx = or through a downstream key from current().derive_key"
                .into(),
        });
    }
    out
}

/// The result of one run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    /// What ran.
    pub config: Config,
    /// What the checker found.
    pub report: Report,
    /// The violations the setting cannot prevent.
    pub limits: Vec<Limit>,
    /// Violations that are not among the limits (or, for a mutation run, the
    /// expected kind missing): the run failed.
    pub unexpected: usize,
    /// Wall time of the run, s.
    pub seconds: f64,
}

struct Services {
    bin: PathBuf,
    /// Each service's command line (subcommand first).
    args: Vec<Vec<String>>,
    children: Vec<Option<Child>>,
    urls: Vec<String>,
    /// Where their stderr goes (`service-N.log`).
    logs: PathBuf,
    /// Each service's clock offset (a `faketime` offset such as `+90`), if skewed.
    skew: Vec<Option<String>>,
}

impl Services {
    async fn start(&mut self, i: usize) -> Result<(), BoxError> {
        let log = history::open_append(&self.logs.join(format!("service-{i}.log")))?;
        let mut command = Command::new(&self.bin);
        if let Some(offset) = &self.skew[i] {
            // libfaketime preloaded into the service itself (the `faketime`
            // command would fork, and a pause would stop only the parent).
            // The wall clock moves; the monotonic one (Tokio's timers) does not.
            command
                .env("LD_PRELOAD", faketime_lib().ok_or("libfaketime not found")?)
                .env("FAKETIME", offset)
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        let mut child = command
            .args(&self.args[i])
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().expect("piped");
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .map_err(|_| format!("service {i} did not start within 20 s"))??;
        if !line.is_some_and(|l| l.contains("listening on")) {
            return Err(format!("service {i} failed to start").into());
        }
        // Keep draining its stdout so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.children[i] = Some(child);
        Ok(())
    }

    fn pid(&self, i: usize) -> Option<u32> {
        self.children[i].as_ref().and_then(Child::id)
    }

    async fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.children[i].take() {
            let _ = child.kill().await;
        }
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status();
}

/// libfaketime's multi-threaded library: `IDEM_FAKETIME_LIB`, or where
/// Debian's `faketime` package puts it.
fn faketime_lib() -> Option<PathBuf> {
    std::env::var_os("IDEM_FAKETIME_LIB")
        .map(PathBuf::from)
        .into_iter()
        .chain(
            [
                "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
                "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
                "/usr/lib/faketime/libfaketimeMT.so.1",
            ]
            .map(PathBuf::from),
        )
        .find(|p| p.is_file())
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The PostgreSQL server the runs use: `IDEM_POSTGRES_URL`, or the local one.
fn postgres_server_url() -> String {
    std::env::var("IDEM_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// The database of the runs, `IDEM_CHAOS_DB` (default `idem_chaos`) on that
/// server, created if missing, so a run's tables never meet the tests'.
async fn postgres_url() -> Result<String, BoxError> {
    let server = postgres_server_url();
    let base = server.rsplit_once('/').map_or(server.as_str(), |(b, _)| b);
    let db = std::env::var("IDEM_CHAOS_DB").unwrap_or_else(|_| "idem_chaos".into());
    if db.is_empty() || !db.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!("IDEM_CHAOS_DB: {db:?} is not a plain database name").into());
    }
    let url = format!("{base}/{db}");
    let admin = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&server)
        .await?;
    let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(&db)
        .fetch_optional(&admin)
        .await?;
    if exists.is_none() {
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
            .execute(&admin)
            .await?;
    }
    admin.close().await;
    Ok(url)
}

fn postgres_addr() -> String {
    std::env::var("IDEM_POSTGRES_ADDR").unwrap_or_else(|_| "127.0.0.1:5432".into())
}

/// The Redis Cluster the runs use: `IDEM_CHAOS_CLUSTER` (comma-separated
/// URLs), or `scripts/redis-cluster.sh`'s.
fn cluster_nodes() -> Vec<String> {
    std::env::var("IDEM_CHAOS_CLUSTER")
        .unwrap_or_else(|_| {
            (7201..=7206)
                .map(|p| format!("redis://127.0.0.1:{p}"))
                .collect::<Vec<_>>()
                .join(",")
        })
        .split(',')
        .map(str::to_owned)
        .collect()
}

const PG_SCHEMA: [&str; 4] = [
    "DROP TABLE IF EXISTS idem_chaos, chaos_effects, chaos_downstream, orders, stock, charges, idem_records",
    "DROP SEQUENCE IF EXISTS idem_chaos_token_seq, idem_records_token_seq",
    "CREATE TABLE chaos_effects (op TEXT NOT NULL, token BIGINT NOT NULL, exec TEXT NOT NULL)",
    "CREATE TABLE chaos_downstream (dkey TEXT PRIMARY KEY, op TEXT NOT NULL, exec TEXT NOT NULL)",
];
const SQLITE_SCHEMA: [&str; 2] = [
    "CREATE TABLE IF NOT EXISTS chaos_effects (op TEXT NOT NULL, token INTEGER NOT NULL, exec TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS chaos_downstream (dkey TEXT PRIMARY KEY, op TEXT NOT NULL, exec TEXT NOT NULL)",
];
const COUNT_EFFECTS: &str = "SELECT op, count(*) FROM chaos_effects GROUP BY op";
const COUNT_DOWNSTREAM: &str = "SELECT op, count(*) FROM chaos_downstream GROUP BY op";
const COUNT_ORDERS: &str = "SELECT user_id, count(*) FROM orders GROUP BY user_id";
const COUNT_CHARGES: &str = "SELECT o.user_id || '-pay', count(*) FROM charges c \
                             JOIN orders o ON o.id = c.order_id GROUP BY o.user_id";

/// A Redis server of the run's own, restartable, keeping its data in an
/// append-only file synced on every write (so a restart loses nothing).
struct OwnRedis {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl OwnRedis {
    async fn start(&mut self) -> Result<(), BoxError> {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        self.child = Some(child);
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err("the run's redis-server did not start".into())
    }

    async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }
}

/// Restarts the machine's PostgreSQL (`pg_ctlcluster VERSION main restart`).
async fn restart_postgres(hold: Duration) -> Result<(), BoxError> {
    let version = std::fs::read_dir("/etc/postgresql")?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .max_by_key(|v| v.parse::<u32>().unwrap_or(0))
        .ok_or("no PostgreSQL cluster under /etc/postgresql")?;
    let ctl = |what: &'static str| {
        let version = version.clone();
        async move {
            Command::new("pg_ctlcluster")
                .args(["--skip-systemctl-redirect", &version, "main", what])
                .args(if what == "stop" {
                    &["-m", "immediate"][..]
                } else {
                    &[]
                })
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .await
        }
    };
    // Armed before the stop: a run dropped here (an error, a SIGTERM through
    // `interruptible`) still starts the server it stopped, which other users
    // of the machine share.
    let mut guard = StartOnDrop(Some(version.clone()));
    ctl("stop").await?;
    tokio::time::sleep(hold).await;
    let status = ctl("start").await?;
    if !status.success() {
        return Err("pg_ctlcluster start failed".into());
    }
    guard.0 = None;
    Ok(())
}

/// Starts PostgreSQL cluster `VERSION main` when dropped still holding it.
struct StartOnDrop(Option<String>);

impl Drop for StartOnDrop {
    fn drop(&mut self) {
        if let Some(version) = self.0.take() {
            let _ = std::process::Command::new("pg_ctlcluster")
                .args(["--skip-systemctl-redirect", &version, "main", "start"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// `order-service`, beside this binary (cargo builds both into one directory).
fn order_service_bin(service_bin: &Path) -> PathBuf {
    service_bin.with_file_name("order-service")
}

/// Runs one configuration and checks it.
pub async fn run(config: Config) -> Result<Outcome, BoxError> {
    let began = std::time::Instant::now();
    let out = config.out.clone();
    if out.exists() {
        std::fs::remove_dir_all(&out)?;
    }
    std::fs::create_dir_all(&out)?;
    let out = std::fs::canonicalize(&out)?;
    let run_id = format!("{:x}", now_us() ^ config.seed.rotate_left(17));

    // The store, the proxy in front of it, and where effects are counted.
    let mut own_redis = None;
    let mut proxy = None;
    let pg_url = postgres_url().await?;
    let (spec, downstream) = match config.store {
        StoreKind::Memory => (Spec::Memory, pg_url.clone()),
        StoreKind::Sqlite => (
            Spec::Sqlite(format!("sqlite://{}", out.join("store.db").display())),
            format!("sqlite://{}", out.join("downstream.db").display()),
        ),
        StoreKind::Postgres => {
            let upstream: SocketAddr = postgres_addr().parse()?;
            let p = Proxy::start(0, upstream, config.seed).await?;
            let url = pg_url.replacen(&postgres_addr(), &p.addr().to_string(), 1);
            proxy = Some(p);
            (Spec::Postgres(url), pg_url.clone())
        }
        StoreKind::Redis => {
            let dir = out.join("redis");
            std::fs::create_dir_all(&dir)?;
            let mut r = OwnRedis {
                port: free_port()?,
                dir,
                child: None,
            };
            r.start().await?;
            let upstream: SocketAddr = format!("127.0.0.1:{}", r.port).parse()?;
            let p = Proxy::start(0, upstream, config.seed).await?;
            let url = format!("redis://{}", p.addr());
            proxy = Some(p);
            own_redis = Some(r);
            (Spec::Redis(url), pg_url.clone())
        }
        StoreKind::Cluster => {
            let nodes = cluster_nodes();
            let first = nodes[0].trim_start_matches("redis://").to_owned();
            if tokio::net::TcpStream::connect(&first).await.is_err() {
                return Err(format!(
                    "the Redis Cluster at {first} is not running: start it with \
                     IDEM_CLUSTER_PORTS=\"7201 7202 7203 7204 7205 7206\" IDEM_CLUSTER_REPLICAS=1 \
                     scripts/redis-cluster.sh start (or name its nodes in IDEM_CHAOS_CLUSTER)"
                )
                .into());
            }
            (Spec::Cluster(nodes), pg_url.clone())
        }
    };
    // A memory store lives in its process: services cannot share one.
    let service_count = if config.store == StoreKind::Memory {
        1
    } else {
        config.services
    };
    if matches!(config.mode, Mode::Tx | Mode::Orders)
        && !matches!(config.store, StoreKind::Sqlite | StoreKind::Postgres)
    {
        return Err("tx and orders need a SQL store (sqlite or postgres)".into());
    }
    let workload = if config.mode == Mode::Orders {
        Workload::Orders
    } else {
        Workload::Direct
    };
    let pg = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&pg_url)
        .await?;
    for sql in PG_SCHEMA {
        sqlx::query(sql).execute(&pg).await?;
    }
    let sqlite = match &spec {
        Spec::Sqlite(url) if config.mode == Mode::Orders => {
            let db = stores::sqlite_pool(&url.replace("store.db", "orders.db")).await?;
            Some((db.clone(), db))
        }
        Spec::Sqlite(url) => {
            // The store's tables first, then the effects beside them.
            let _ = stores::sqlite(url).await.map_err(|e| e.to_string())?;
            let store_db = stores::sqlite_pool(url).await?;
            let down = stores::sqlite_pool(&downstream).await?;
            for sql in SQLITE_SCHEMA {
                sqlx::query(sql).execute(&store_db).await?;
                sqlx::query(sql).execute(&down).await?;
            }
            Some((store_db, down))
        }
        _ => None,
    };
    if let (Spec::Postgres(_), false) = (&spec, config.mode == Mode::Orders) {
        idem_runtime::PostgresStore::with_table(pg.clone(), stores::TABLE)?
            .migrate()
            .await?;
    }

    // Services.
    let mut services = Services {
        bin: if config.mode == Mode::Orders {
            order_service_bin(&config.service_bin)
        } else {
            config.service_bin.clone()
        },
        args: Vec::new(),
        children: Vec::new(),
        urls: Vec::new(),
        logs: out.clone(),
        skew: Vec::new(),
    };
    let skews = skews(&config, service_count);
    services.skew = skews.iter().map(|o| o.map(|s| format!("{s:+}"))).collect();
    if config.fault == Kind::Skew && faketime_lib().is_none() {
        return Err("clock skew needs libfaketime (apt-get install faketime)".into());
    }
    for i in 0..service_count {
        let port = free_port()?;
        let mut args = match (&spec, config.mode) {
            (Spec::Sqlite(url), Mode::Orders) => {
                vec![
                    "serve".to_owned(),
                    "--db".into(),
                    url.replace("store.db", "orders.db"),
                ]
            }
            (spec, Mode::Orders) => vec!["serve".to_owned(), "--db".into(), spec.to_arg()],
            _ => vec!["serve".to_owned()],
        };
        args.extend(["--addr".to_owned(), format!("127.0.0.1:{port}")]);
        if config.mode == Mode::Orders {
            services.args.push(args);
            services.children.push(None);
            services.urls.push(format!("http://127.0.0.1:{port}"));
            services.start(i).await?;
            continue;
        }
        args.extend([
            "--store".into(),
            spec.to_arg(),
            "--mode".into(),
            config.mode.name().into(),
            "--executions".into(),
            out.join(format!("executions-{i}.jsonl"))
                .display()
                .to_string(),
            "--work-ms".into(),
            config.work.as_millis().to_string(),
            "--replica-ack".into(),
            config.replica_ack.to_string(),
        ]);
        if config.mode == Mode::Derived {
            args.extend(["--downstream".to_owned(), downstream.clone()]);
        }
        services.args.push(args);
        services.children.push(None);
        services.urls.push(format!("http://127.0.0.1:{port}"));
        services.start(i).await?;
    }

    // Clients.
    let start_us = now_us();
    let deadline_us = start_us + (config.duration + Duration::from_secs(60)).as_micros() as u64;
    let spread = config.duration.saturating_sub(Duration::from_secs(1));
    let mut clients = Vec::new();
    let mut ops = Vec::new();
    for k in 0..config.clients {
        let prefix = format!("{run_id}-c{k}-");
        ops.extend((0..config.ops).flat_map(|i| workload.ops(&format!("{prefix}{i}"))));
        clients.push(
            Command::new(std::env::current_exe()?)
                .arg("client")
                .args(["--id", &k.to_string(), "--prefix", &prefix])
                .args(["--ops", &config.ops.to_string()])
                .args(["--concurrency", &config.concurrency.to_string()])
                .args(["--services", &services.urls.join(",")])
                .arg("--out")
                .arg(out.join(format!("client-{k}.jsonl")))
                .args(["--seed", &(config.seed ^ (k as u64 + 1)).to_string()])
                .args(["--deadline-us", &deadline_us.to_string()])
                .args(["--spread-ms", &spread.as_millis().to_string()])
                .args([
                    "--workload",
                    if workload == Workload::Orders {
                        "orders"
                    } else {
                        "direct"
                    },
                ])
                .kill_on_drop(true)
                .spawn()?,
        );
    }

    // The nemesis, until the duration is up; then everything heals.
    let mut faults_file = history::open_append(&out.join("faults.jsonl"))?;
    let mut rng = Rng::new(config.seed);
    let nemesis_end = tokio::time::Instant::now() + spread;
    if config.fault == Kind::Skew {
        let what = skews
            .iter()
            .enumerate()
            .map(|(i, s)| format!("service {i} {:+} s", s.unwrap_or(0)))
            .collect::<Vec<_>>()
            .join(", ");
        let mut fault = nemesis::window(format!("clock skew: {what}"));
        fault.end_us = fault.start_us;
        history::append(&mut faults_file, &fault)?;
    }
    if config.fault != Kind::None {
        loop {
            let (quiet, action, hold) = nemesis::next(
                &mut rng,
                config.fault,
                config.store.faults(),
                service_count,
                LEASE,
            );
            tokio::time::sleep(quiet).await;
            if tokio::time::Instant::now() >= nemesis_end {
                break;
            }
            let mut fault = match &action {
                Action::Kill(i) => nemesis::window(format!("kill service {i}")),
                Action::Pause(i) => nemesis::window(format!("pause service {i}")),
                Action::Net(_, what) => nemesis::window((*what).into()),
                Action::Reset => nemesis::window("reset connections".into()),
                Action::Restart => nemesis::window(format!("restart {}", config.store.name())),
                Action::Failover { lossy, .. } => {
                    nemesis::window(if *lossy { "lossy failover" } else { "failover" }.into())
                }
            };
            match action {
                Action::Kill(i) => {
                    services.kill(i).await;
                    tokio::time::sleep(hold).await;
                    services.start(i).await?;
                }
                Action::Pause(i) => {
                    if let Some(pid) = services.pid(i) {
                        signal(pid, "-STOP");
                        tokio::time::sleep(hold).await;
                        signal(pid, "-CONT");
                    }
                }
                Action::Net(faults, _) => {
                    if let Some(p) = &proxy {
                        p.set(faults);
                        tokio::time::sleep(hold).await;
                        p.set(Faults::default());
                    }
                }
                Action::Reset => {
                    if let Some(p) = &proxy {
                        p.reset();
                    }
                }
                Action::Restart => match (&mut own_redis, config.store) {
                    (Some(r), _) => {
                        r.stop().await;
                        tokio::time::sleep(hold).await;
                        r.start().await?;
                    }
                    (None, StoreKind::Postgres) => restart_postgres(hold).await?,
                    _ => {}
                },
                Action::Failover { pick, lossy } => {
                    if let Spec::Cluster(nodes) = &spec {
                        // A failover Redis refuses or does not finish in time
                        // (a replica still syncing) is recorded as such; the
                        // run goes on.
                        fault.what = crate::cluster::failover(nodes, pick, lossy, hold)
                            .await
                            .unwrap_or_else(|e| format!("failover not done: {e}"));
                    }
                }
            }
            fault.end_us = now_us();
            history::append(&mut faults_file, &fault)?;
        }
    }
    for mut c in clients {
        c.wait().await?;
    }

    // Every operation once more, against the healed system.
    let verify_path = out.join("verify.jsonl");
    let first_ops: Vec<String> = ops
        .iter()
        .filter(|o| !o.ends_with("-pay"))
        .cloned()
        .collect();
    client::run(client::Settings {
        id: u32::MAX,
        services: services.urls.clone(),
        ops: first_ops,
        concurrency: 16,
        out: verify_path.clone(),
        seed: config.seed,
        deadline_us: now_us() + 30_000_000,
        timeout: Duration::from_secs(10),
        phase: Phase::Verify,
        spread: Duration::ZERO,
        workload,
    })
    .await?;
    for i in 0..service_count {
        services.kill(i).await;
    }

    // Count the effects where they were made.
    let executions = read_executions(&out, &skews)?;
    let mut effects: BTreeMap<String, usize> = BTreeMap::new();
    let count = |rows: Vec<(String, i64)>, effects: &mut BTreeMap<String, usize>| {
        for (op, n) in rows {
            effects.insert(op, n as usize);
        }
    };
    match (config.mode, &sqlite) {
        (Mode::Plain, _) => {
            for e in &executions {
                *effects.entry(e.op.clone()).or_default() += 1;
            }
        }
        (Mode::Derived, Some((_, down))) => count(
            sqlx::query_as(COUNT_DOWNSTREAM).fetch_all(down).await?,
            &mut effects,
        ),
        (Mode::Derived, None) => count(
            sqlx::query_as(COUNT_DOWNSTREAM).fetch_all(&pg).await?,
            &mut effects,
        ),
        (Mode::Tx, Some((store_db, _))) => count(
            sqlx::query_as(COUNT_EFFECTS).fetch_all(store_db).await?,
            &mut effects,
        ),
        (Mode::Tx, None) => count(
            sqlx::query_as(COUNT_EFFECTS).fetch_all(&pg).await?,
            &mut effects,
        ),
        (Mode::Orders, Some((db, _))) => {
            count(
                sqlx::query_as(COUNT_ORDERS).fetch_all(db).await?,
                &mut effects,
            );
            count(
                sqlx::query_as(COUNT_CHARGES).fetch_all(db).await?,
                &mut effects,
            );
        }
        (Mode::Orders, None) => {
            count(
                sqlx::query_as(COUNT_ORDERS).fetch_all(&pg).await?,
                &mut effects,
            );
            count(
                sqlx::query_as(COUNT_CHARGES).fetch_all(&pg).await?,
                &mut effects,
            );
        }
    }
    // Kept beside the history, so the run can be checked again later.
    std::fs::write(out.join("effects.json"), serde_json::to_vec(&effects)?)?;
    if let Some(r) = &mut own_redis {
        r.stop().await;
    }
    drop(proxy);

    std::fs::write(out.join("ops.json"), serde_json::to_vec(&ops)?)?;
    judge(
        config,
        &out,
        &ops,
        &executions,
        &effects,
        began.elapsed().as_secs_f64(),
    )
}

/// Each service's clock offset in seconds under `skew` (30 s to 10 min,
/// either way, drawn from the seed), `None` otherwise.
fn skews(config: &Config, services: usize) -> Vec<Option<i64>> {
    let mut rng = Rng::new(config.seed ^ 0x5eed);
    (0..services)
        .map(|_| {
            (config.fault == Kind::Skew).then(|| {
                let s = rng.range(30, 600) as i64;
                if rng.chance(0.5) {
                    s
                } else {
                    -s
                }
            })
        })
        .collect()
}

/// Every execution the services recorded, on the machine's clock: a skewed
/// service stamps its executions by its own (faked) clock, so they are put
/// back to line up with the requests.
fn read_executions(out: &Path, skews: &[Option<i64>]) -> std::io::Result<Vec<Execution>> {
    let mut executions: Vec<Execution> = Vec::new();
    for (i, skew) in skews.iter().enumerate() {
        let offset_us = skew.unwrap_or(0) * 1_000_000;
        executions.extend(
            history::read::<Execution>(&out.join(format!("executions-{i}.jsonl")))?
                .into_iter()
                .map(|mut e| {
                    e.at_us = e.at_us.saturating_add_signed(-offset_us);
                    e
                }),
        );
    }
    executions.sort_by_key(|e| e.at_us);
    Ok(executions)
}

/// Checks a finished run's history and writes its report and picture.
fn judge(
    config: Config,
    out: &Path,
    ops: &[String],
    executions: &[Execution],
    effects: &BTreeMap<String, usize>,
    seconds: f64,
) -> Result<Outcome, BoxError> {
    let mut requests: Vec<Request> = Vec::new();
    for k in 0..config.clients {
        requests.extend(history::read::<Request>(
            &out.join(format!("client-{k}.jsonl")),
        )?);
    }
    requests.extend(history::read::<Request>(&out.join("verify.jsonl"))?);
    let faults: Vec<Fault> = history::read(&out.join("faults.jsonl"))?;
    let report = check::check(ops, &requests, executions, effects, &faults);
    let limits = limits(&config);
    let unexpected = match &config.expect {
        Some(kind) => usize::from(report.count(kind) == 0),
        None => report
            .violations
            .iter()
            .filter(|v| !limits.iter().any(|l| l.kind == v.kind))
            .count(),
    };
    let title = format!(
        "{} · {} · {} · seed {}",
        config.store.name(),
        config.mode.name(),
        config.fault.name(),
        config.seed
    );
    std::fs::write(
        out.join("latency.svg"),
        crate::plot::svg(&title, &requests, &faults, &report),
    )?;
    let outcome = Outcome {
        config,
        report,
        limits,
        unexpected,
        seconds,
    };
    std::fs::write(
        out.join("report.json"),
        serde_json::to_vec_pretty(&outcome)?,
    )?;
    Ok(outcome)
}

/// Checks a recorded run again, with this build's checker: its settings from
/// `report.json`, its histories, its effect counts (`effects.json`) and its
/// operations (`ops.json`; for a run recorded before that file existed,
/// every operation its histories name). Rewrites `report.json` and
/// `latency.svg`.
pub fn recheck(out: &Path) -> Result<Outcome, BoxError> {
    let recorded: Outcome = serde_json::from_slice(&std::fs::read(out.join("report.json"))?)?;
    let config = recorded.config;
    let effects: BTreeMap<String, usize> =
        serde_json::from_slice(&std::fs::read(out.join("effects.json")).map_err(|e| {
            format!(
                "{}: no effects.json, so it cannot be checked again: {e}",
                out.display()
            )
        })?)?;
    let ops: Vec<String> = match std::fs::read(out.join("ops.json")) {
        Ok(bytes) => serde_json::from_slice(&bytes)?,
        Err(_) => {
            let mut ops = std::collections::BTreeSet::new();
            for k in 0..config.clients {
                for r in history::read::<Request>(&out.join(format!("client-{k}.jsonl")))? {
                    ops.insert(r.op);
                }
            }
            for r in history::read::<Request>(&out.join("verify.jsonl"))? {
                ops.insert(r.op);
            }
            if config.mode == Mode::Orders {
                let orders: Vec<String> = ops
                    .iter()
                    .filter(|o| !o.ends_with("-pay"))
                    .cloned()
                    .collect();
                ops.extend(orders.into_iter().map(|o| format!("{o}-pay")));
            }
            ops.into_iter().collect()
        }
    };
    let services = if config.store == StoreKind::Memory {
        1
    } else {
        config.services
    };
    let executions = read_executions(out, &skews(&config, services))?;
    judge(config, out, &ops, &executions, &effects, recorded.seconds)
}

/// The directory a run of `config` writes to under `root`.
pub fn run_dir(
    root: &Path,
    store: StoreKind,
    mode: Mode,
    fault: Kind,
    replica_ack: u32,
) -> PathBuf {
    let ack = match replica_ack {
        0 => String::new(),
        n => format!("-ack{n}"),
    };
    root.join(format!(
        "{}-{}-{}{ack}",
        store.name(),
        mode.name(),
        fault.name()
    ))
}
