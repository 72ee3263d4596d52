//! `idem-chaos`: faults in, history out, a checker on top.
//!
//! A workload of retried operations runs through service processes that call
//! `#[idempotent]` functions against a real store, while a nemesis kills,
//! pauses and cuts them off on a seeded schedule. Every request and answer is
//! recorded; once the faults heal, a checker reads the history and counts the
//! effects. See RELIABILITY.md for the figures, the pictures and the limits.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

mod check;
mod client;
mod cluster;
mod history;
mod nemesis;
mod plot;
mod proxy;
mod rng;
mod run;
mod service;
mod stores;
mod suite;

const USAGE: &str = "usage:
  idem-chaos suite [--short | --long] [--seed N] [--out DIR] [--service-bin PATH]
                   [--unfenced-bin PATH]
  idem-chaos run --store STORE --mode MODE --fault FAULT [--seed N] [--services N]
                 [--clients N] [--ops N] [--concurrency N] [--duration-s N] [--work-ms N]
                 [--out DIR] [--service-bin PATH] [--expect VIOLATION] [--replica-ack N]

  STORE  memory | sqlite | postgres | redis | cluster
  MODE   plain (an effect outside every store), derived (a downstream that
         deduplicates by current().derive_key), tx (the effect commits with the record),
         orders (order-service over HTTP: orders in tx, payments by a derived provider key;
         sqlite or postgres)
  FAULT  none | kill | pause | net | restart | failover | lossy-failover | skew | mix
         (failovers: cluster only; skew: the services' clocks off, with pauses)
  --service-bin  the binary the services run (a build with fencing disabled, to
                 show the checker catching it); default: this one
  --replica-ack  redis and cluster: completions wait for N replicas to acknowledge
                 them (RedisStore::with_replica_ack, 1 s timeout)
  --expect       the run must show this violation (for such a build), e.g.
                 'response differs'
  --unfenced-bin a build with fencing disabled (RUSTFLAGS='--cfg idem_unfenced'):
                 the suite adds a run that passes only if the checker catches it

  idem-chaos check DIR...   check recorded runs again with this build's checker (a run's
                            directory, or a suite's: every run in it, and its table.md)

  (internal) idem-chaos serve ..., idem-chaos client ...";

/// `--flag value` pairs, or `None` on an unknown flag or a missing value.
fn flags<'a>(
    rest: &'a [String],
    known: &[&str],
    switches: &[&str],
) -> Option<Vec<(&'a str, &'a str)>> {
    let mut out = Vec::new();
    let mut it = rest.iter();
    while let Some(flag) = it.next() {
        if switches.contains(&flag.as_str()) {
            out.push((flag.as_str(), ""));
        } else if known.contains(&flag.as_str()) {
            out.push((flag.as_str(), it.next()?.as_str()));
        } else {
            return None;
        }
    }
    Some(out)
}

fn get<'a>(flags: &[(&'a str, &'a str)], name: &str) -> Option<&'a str> {
    flags
        .iter()
        .rev()
        .find(|(f, _)| *f == name)
        .map(|(_, v)| *v)
}

fn num<T: std::str::FromStr>(flags: &[(&str, &str)], name: &str, default: T) -> Result<T, String> {
    match get(flags, name) {
        None => Ok(default),
        Some(v) => v.parse().map_err(|_| format!("{name}: not a number: {v}")),
    }
}

type Res = Result<ExitCode, Box<dyn std::error::Error + Send + Sync>>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a Tokio runtime");
    let result = runtime.block_on(async {
        match args.first().map(String::as_str) {
            Some("serve") => serve(&args[1..]).await,
            Some("client") => client(&args[1..]).await,
            Some("run") => interruptible(run(&args[1..])).await,
            Some("suite") => interruptible(suite(&args[1..])).await,
            Some("check") => recheck(&args[1..]),
            Some("-h" | "--help" | "help") => {
                println!("{USAGE}");
                Ok(ExitCode::SUCCESS)
            }
            _ => Err(USAGE.into()),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("idem-chaos: {e}");
            ExitCode::from(2)
        }
    }
}

/// Runs `f` until it ends or the controller is told to stop (SIGINT, SIGTERM,
/// SIGHUP: a Ctrl-C, a CI job's timeout, a closed terminal). Stopping drops
/// the run, so its service, client and Redis processes are killed (they are
/// spawned `kill_on_drop`, a paused service too) instead of outliving it.
async fn interruptible(f: impl std::future::Future<Output = Res>) -> Res {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::select! {
        r = f => r,
        _ = term.recv() => Err("stopped by SIGTERM".into()),
        _ = int.recv() => Err("stopped by SIGINT".into()),
        _ = hup.recv() => Err("stopped by SIGHUP".into()),
    }
}

async fn serve(args: &[String]) -> Res {
    let f = flags(
        args,
        &[
            "--addr",
            "--store",
            "--mode",
            "--downstream",
            "--executions",
            "--work-ms",
            "--replica-ack",
        ],
        &[],
    )
    .ok_or(USAGE)?;
    let settings = service::Settings {
        addr: get(&f, "--addr").unwrap_or("127.0.0.1:0").into(),
        store: stores::Spec::parse(get(&f, "--store").ok_or("--store is required")?)
            .ok_or("--store: unknown store")?,
        mode: service::Mode::parse(get(&f, "--mode").unwrap_or("plain"))
            .ok_or("--mode: unknown mode")?,
        downstream: get(&f, "--downstream").map(str::to_owned),
        executions: get(&f, "--executions")
            .ok_or("--executions is required")?
            .into(),
        work: Duration::from_millis(num(&f, "--work-ms", 40)?),
        replica_ack: num(&f, "--replica-ack", 0)?,
    };
    service::serve(settings).await.map_err(|e| e.to_string())?;
    Ok(ExitCode::SUCCESS)
}

async fn client(args: &[String]) -> Res {
    let f = flags(
        args,
        &[
            "--id",
            "--prefix",
            "--ops",
            "--concurrency",
            "--services",
            "--out",
            "--seed",
            "--deadline-us",
            "--spread-ms",
            "--timeout-ms",
            "--workload",
        ],
        &[],
    )
    .ok_or(USAGE)?;
    let prefix = get(&f, "--prefix").ok_or("--prefix is required")?;
    let ops: usize = num(&f, "--ops", 10)?;
    client::run(client::Settings {
        id: num(&f, "--id", 0)?,
        services: get(&f, "--services")
            .ok_or("--services is required")?
            .split(',')
            .map(str::to_owned)
            .collect(),
        ops: (0..ops).map(|i| format!("{prefix}{i}")).collect(),
        concurrency: num(&f, "--concurrency", 4)?,
        out: get(&f, "--out").ok_or("--out is required")?.into(),
        seed: num(&f, "--seed", 1)?,
        deadline_us: num(&f, "--deadline-us", u64::MAX)?,
        timeout: Duration::from_millis(num(&f, "--timeout-ms", 1500)?),
        phase: history::Phase::Work,
        spread: Duration::from_millis(num(&f, "--spread-ms", 0)?),
        workload: match get(&f, "--workload").unwrap_or("direct") {
            "direct" => client::Workload::Direct,
            "orders" => client::Workload::Orders,
            other => return Err(format!("--workload: unknown workload {other}").into()),
        },
    })
    .await?;
    Ok(ExitCode::SUCCESS)
}

fn service_bin(f: &[(&str, &str)]) -> Result<PathBuf, std::io::Error> {
    match get(f, "--service-bin") {
        Some(p) => Ok(PathBuf::from(p)),
        None => std::env::current_exe(),
    }
}

async fn run(args: &[String]) -> Res {
    let f = flags(
        args,
        &[
            "--store",
            "--mode",
            "--fault",
            "--seed",
            "--services",
            "--clients",
            "--ops",
            "--concurrency",
            "--duration-s",
            "--work-ms",
            "--out",
            "--service-bin",
            "--expect",
            "--replica-ack",
        ],
        &[],
    )
    .ok_or(USAGE)?;
    let store = run::StoreKind::parse(get(&f, "--store").ok_or("--store is required")?)
        .ok_or("--store: unknown store")?;
    let mode = service::Mode::parse(get(&f, "--mode").unwrap_or("derived"))
        .ok_or("--mode: unknown mode")?;
    let fault = nemesis::Kind::parse(get(&f, "--fault").unwrap_or("mix"))
        .ok_or("--fault: unknown fault")?;
    let root = PathBuf::from(get(&f, "--out").unwrap_or("target/chaos"));
    let replica_ack = num(&f, "--replica-ack", 0)?;
    let config = run::Config {
        store,
        mode,
        fault,
        seed: num(&f, "--seed", 1)?,
        services: num(&f, "--services", 2)?,
        clients: num(&f, "--clients", 3)?,
        ops: num(&f, "--ops", 40)?,
        concurrency: num(&f, "--concurrency", 4)?,
        duration: Duration::from_secs(num(&f, "--duration-s", 12)?),
        work: Duration::from_millis(num(&f, "--work-ms", 40)?),
        out: run::run_dir(&root, store, mode, fault, replica_ack),
        service_bin: service_bin(&f)?,
        expect: get(&f, "--expect").map(str::to_owned),
        replica_ack,
    };
    let outcome = run::run(config).await?;
    print!("{}", suite::header());
    println!("{}", suite::row(&outcome));
    for v in outcome.report.violations.iter().take(5) {
        println!("  {}: {} — {}", v.kind, v.op, v.detail);
    }
    println!(
        "history, report and picture: {}",
        outcome.config.out.display()
    );
    Ok(if outcome.unexpected == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn recheck(args: &[String]) -> Res {
    if args.is_empty() {
        return Err(USAGE.into());
    }
    let mut failed = 0;
    for dir in args.iter().map(PathBuf::from) {
        if dir.join("report.json").is_file() {
            let outcome = run::recheck(&dir)?;
            print!("{}", suite::header());
            println!("{}", suite::row(&outcome));
            failed += usize::from(outcome.unexpected > 0);
            continue;
        }
        // A suite's directory: its runs in the order they ran.
        let mut runs: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&dir)?
            .filter_map(|e| {
                let path = e.ok()?.path();
                let modified = path.join("report.json").metadata().ok()?.modified().ok()?;
                Some((modified, path))
            })
            .collect();
        runs.sort();
        let mut outcomes = Vec::new();
        for (_, path) in runs {
            outcomes.push(run::recheck(&path)?);
        }
        failed += outcomes.iter().filter(|o| o.unexpected > 0).count();
        println!("{}", suite::table(&dir, &outcomes)?);
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn suite(args: &[String]) -> Res {
    let f = flags(
        args,
        &["--seed", "--out", "--service-bin", "--unfenced-bin"],
        &["--short", "--long"],
    )
    .ok_or(USAGE)?;
    let size = if get(&f, "--long").is_some() {
        suite::Size::Long
    } else {
        suite::Size::Short
    };
    let settings = suite::Settings {
        size,
        seed: num(&f, "--seed", 1)?,
        out: PathBuf::from(get(&f, "--out").unwrap_or("target/chaos")),
        service_bin: service_bin(&f)?,
        unfenced_bin: get(&f, "--unfenced-bin").map(PathBuf::from),
    };
    let outcomes = suite::run(&settings).await?;
    let table = suite::table(&settings.out, &outcomes)?;
    println!("{table}");
    let failed = outcomes.iter().filter(|o| o.unexpected > 0).count();
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        eprintln!("idem-chaos: {failed} run(s) broke a promise they should keep");
        ExitCode::FAILURE
    })
}
