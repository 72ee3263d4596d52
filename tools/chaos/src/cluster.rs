//! Failing over a Redis Cluster master to its replica, two ways:
//!
//! - **graceful** (`CLUSTER FAILOVER` on the replica): the master stops
//!   taking writes, the replica catches up, then they swap. Nothing is lost.
//! - **lossy**: the replica falls behind (it is stopped, and a burst of
//!   writes fills its link), the master keeps acknowledging writes, then the
//!   master dies and the replica takes over (`CLUSTER FAILOVER TAKEOVER`)
//!   without what it never received: Redis replication is asynchronous, so
//!   an acknowledged completion can vanish. The old master is started again
//!   and rejoins as the new master's replica.

use std::time::Duration;

use redis::aio::MultiplexedConnection;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One node, as `CLUSTER NODES` lists it.
#[derive(Debug, Clone)]
struct Node {
    addr: String,
    id: String,
    master: bool,
    master_id: String,
}

async fn connect(addr: &str) -> Result<MultiplexedConnection, BoxError> {
    let client = redis::Client::open(format!("redis://{addr}"))?;
    Ok(tokio::time::timeout(
        Duration::from_secs(2),
        client.get_multiplexed_async_connection(),
    )
    .await
    .map_err(|_| format!("{addr}: no answer"))??)
}

async fn nodes(seeds: &[String]) -> Result<Vec<Node>, BoxError> {
    for seed in seeds {
        let Ok(mut con) = connect(seed.trim_start_matches("redis://")).await else {
            continue;
        };
        let Ok(text) = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async::<String>(&mut con)
            .await
        else {
            continue;
        };
        return Ok(text
            .lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                let flags = *f.get(2)?;
                if flags.contains("fail") || flags.contains("handshake") {
                    return None;
                }
                Some(Node {
                    id: f[0].to_owned(),
                    addr: f[1].split('@').next()?.to_owned(),
                    master: flags.contains("master"),
                    master_id: f.get(3)?.to_string(),
                })
            })
            .collect());
    }
    Err("no cluster node answered".into())
}

/// One section of `INFO`, as text.
async fn info(con: &mut MultiplexedConnection, section: &str) -> Result<String, BoxError> {
    Ok(redis::cmd("INFO").arg(section).query_async(con).await?)
}

/// A `field:value` line's value in `INFO` text.
fn field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

async fn info_field(addr: &str, section: &str, name: &str) -> Result<String, BoxError> {
    let text = info(&mut connect(addr).await?, section).await?;
    field(&text, name)
        .map(str::to_owned)
        .ok_or_else(|| format!("{addr}: no {name} in INFO {section}").into())
}

async fn config(addr: &str, name: &str) -> Result<String, BoxError> {
    let mut con = connect(addr).await?;
    let pair: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg(name)
        .query_async(&mut con)
        .await?;
    pair.get(1)
        .cloned()
        .ok_or_else(|| format!("{addr}: no {name} in CONFIG GET").into())
}

/// Waits until `addr` reports `role` (`master`, `slave`) and the cluster is ok:
/// one connection and two reads a poll (the node may be down at first).
async fn wait_role(addr: &str, role: &str) -> Result<(), BoxError> {
    for _ in 0..200 {
        if let Ok(mut con) = connect(addr).await {
            let replication = info(&mut con, "replication").await.unwrap_or_default();
            if field(&replication, "role") == Some(role) {
                let cluster: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async(&mut con)
                    .await
                    .unwrap_or_default();
                if cluster.contains("cluster_state:ok") {
                    return Ok(());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("{addr} did not become {role}").into())
}

/// Waits until the replica at `addr` has finished its sync with its master
/// (both fields from one read of `INFO replication`).
async fn wait_synced(addr: &str) -> Result<(), BoxError> {
    for _ in 0..200 {
        if let Ok(mut con) = connect(addr).await {
            let replication = info(&mut con, "replication").await.unwrap_or_default();
            if field(&replication, "master_link_status") == Some("up")
                && field(&replication, "master_sync_in_progress") == Some("0")
            {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("{addr} did not finish its sync").into())
}

fn signal(pid: &str, sig: &str) {
    let _ = std::process::Command::new("kill").args([sig, pid]).status();
}

/// Waits (up to 10 s) until process `pid` is gone (or a zombie: its sockets
/// are closed, and a container's init may never reap it).
async fn gone(pid: &str) -> Result<(), BoxError> {
    let status = std::path::Path::new("/proc").join(pid).join("status");
    for _ in 0..1000 {
        match std::fs::read_to_string(&status) {
            Err(_) => return Ok(()),
            Ok(s)
                if s.lines()
                    .any(|l| l.starts_with("State:") && l.contains('Z')) =>
            {
                return Ok(())
            }
            Ok(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(format!("process {pid} did not exit after SIGKILL").into())
}

/// Waits (up to 10 s) until 127.0.0.1:`port` can be bound (with
/// `SO_REUSEADDR`, as Redis binds it).
async fn port_free(port: &str) {
    for _ in 0..100 {
        if std::net::TcpListener::bind(format!("127.0.0.1:{port}")).is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether a server at `addr` answers within 5 s (a daemonized server that
/// failed to bind has exited by then).
async fn answers(addr: &str) -> bool {
    for _ in 0..50 {
        if let Ok(mut con) = connect(addr).await {
            if redis::cmd("PING")
                .query_async::<String>(&mut con)
                .await
                .is_ok()
            {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Fails over a master, chosen by `pick`, to its replica; returns what was done.
pub async fn failover(
    seeds: &[String],
    pick: usize,
    lossy: bool,
    hold: Duration,
) -> Result<String, BoxError> {
    let all = nodes(seeds).await?;
    let replicas: Vec<&Node> = all
        .iter()
        .filter(|n| !n.master && n.master_id != "-")
        .collect();
    if replicas.is_empty() {
        return Err("the cluster has no replicas: start it with IDEM_CLUSTER_REPLICAS=1".into());
    }
    let replica = replicas[pick % replicas.len()];
    let master = all
        .iter()
        .find(|n| n.id == replica.master_id)
        .ok_or("the replica's master is not in the cluster")?;
    if !lossy {
        let mut con = connect(&replica.addr).await?;
        redis::cmd("CLUSTER")
            .arg("FAILOVER")
            .query_async::<()>(&mut con)
            .await?;
        wait_role(&replica.addr, "master").await?;
        // The old master turns replica and syncs; until it has, another
        // failover to it would be refused. Best effort: the run goes on.
        if wait_role(&master.addr, "slave").await.is_ok() {
            let _ = wait_synced(&master.addr).await;
        }
        return Ok(format!("failover {} → {}", master.addr, replica.addr));
    }
    // What it takes to start the master again.
    let port = master
        .addr
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .to_owned();
    let dir = config(&master.addr, "dir").await?;
    let nodes_file = config(&master.addr, "cluster-config-file").await?;
    let timeout = config(&master.addr, "cluster-node-timeout").await?;
    let logfile = config(&master.addr, "logfile").await?;
    let master_pid = info_field(&master.addr, "server", "process_id").await?;
    let replica_pid = info_field(&replica.addr, "server", "process_id").await?;

    // The replica stops reading; a burst fills the link, so what the master
    // acknowledges from now on stays in the master's output buffer.
    signal(&replica_pid, "-STOP");
    let mut con = connect(&master.addr).await?;
    let filler = vec![b'x'; 4 << 20];
    for i in 0..8 {
        // A key of the master's own slots: try names until one is not MOVED.
        for n in 0..2000 {
            let key = format!("chaos-filler-{i}-{n}");
            if redis::cmd("SET")
                .arg(&key)
                .arg(&filler)
                .arg("PX")
                .arg(60_000)
                .query_async::<()>(&mut con)
                .await
                .is_ok()
            {
                break;
            }
        }
    }
    tokio::time::sleep(hold).await;
    signal(&master_pid, "-KILL");
    signal(&replica_pid, "-CONT");
    let mut con = connect(&replica.addr).await?;
    redis::cmd("CLUSTER")
        .arg("FAILOVER")
        .arg("TAKEOVER")
        .query_async::<()>(&mut con)
        .await?;
    wait_role(&replica.addr, "master").await?;
    // A killed process holding tens of MB takes a moment to go; restarted
    // before it is gone, the new server cannot bind the port and exits.
    gone(&master_pid).await?;
    // The old master comes back empty and rejoins as a replica. Its port may
    // still be held for a moment after the process is gone (seen once: the
    // restarted server could not bind and exited): wait until it can be
    // bound, and start again if the server still does not answer.
    let mut started = false;
    for _ in 0..3 {
        port_free(&port).await;
        let status = tokio::process::Command::new("redis-server")
            .args([
                "--port",
                &port,
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
            ])
            .args([
                "--cluster-config-file",
                &nodes_file,
                "--cluster-node-timeout",
                &timeout,
            ])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "yes"])
            .args(["--dir", &dir, "--logfile", &logfile])
            .status()
            .await?;
        if !status.success() {
            return Err(format!("could not restart {}", master.addr).into());
        }
        if answers(&master.addr).await {
            started = true;
            break;
        }
    }
    if !started {
        return Err(format!("{} did not come back (see {logfile})", master.addr).into());
    }
    wait_role(&master.addr, "slave").await?;
    wait_synced(&master.addr).await?;
    Ok(format!("lossy failover {} → {}", master.addr, replica.addr))
}
