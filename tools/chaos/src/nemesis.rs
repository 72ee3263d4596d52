//! The nemesis: faults on a seeded schedule, each held for a while and healed,
//! each recorded as a window in the history.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::history::{now_us, Fault};
use crate::proxy::Faults;
use crate::rng::Rng;

/// Which faults a run injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// None: the baseline.
    None,
    /// SIGKILL a service process mid-request, restart it.
    Kill,
    /// SIGSTOP a service process for longer than the lease, then SIGCONT.
    Pause,
    /// Network faults between the services and the store (the proxy).
    Net,
    /// Restart the store's server.
    Restart,
    /// Fail a Redis Cluster master over to its replica (`CLUSTER FAILOVER`).
    Failover,
    /// Kill a Redis Cluster master whose replica lags, and let the replica
    /// take over without what it never received.
    LossyFailover,
    /// Every service's wall clock off by 30 s to 10 min (`faketime`), and
    /// pauses past the lease: leases must be judged by the store's clock.
    Skew,
    /// Any of the above that the store allows, chosen at random each time.
    Mix,
}

impl Kind {
    /// Parses the names `name` gives.
    pub fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "none" => Kind::None,
            "kill" => Kind::Kill,
            "pause" => Kind::Pause,
            "net" => Kind::Net,
            "restart" => Kind::Restart,
            "failover" => Kind::Failover,
            "lossy-failover" => Kind::LossyFailover,
            "skew" => Kind::Skew,
            "mix" => Kind::Mix,
            _ => return None,
        })
    }

    /// The fault's name on the command line and in tables.
    pub fn name(self) -> &'static str {
        match self {
            Kind::None => "none",
            Kind::Kill => "kill",
            Kind::Pause => "pause",
            Kind::Net => "net",
            Kind::Restart => "restart",
            Kind::Failover => "failover",
            Kind::LossyFailover => "lossy-failover",
            Kind::Skew => "skew",
            Kind::Mix => "mix",
        }
    }
}

/// One fault to inject: what, and for how long.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// SIGKILL service `n`; restart it after the hold.
    Kill(usize),
    /// SIGSTOP service `n`; SIGCONT after the hold.
    Pause(usize),
    /// Put these proxy faults in force for the hold.
    Net(Faults, &'static str),
    /// Reset every connection through the proxy (no hold).
    Reset,
    /// Stop the store's server; start it again after the hold.
    Restart,
    /// Fail a master over (lossy or not), the one `pick` chooses.
    Failover {
        /// Which replica takes over.
        pick: usize,
        /// Whether the replica lags and the master dies.
        lossy: bool,
    },
}

/// The next fault of a run: the quiet time before it, the fault, how long it is held.
pub fn next(
    rng: &mut Rng,
    kind: Kind,
    allowed: &[Kind],
    services: usize,
    lease: Duration,
) -> (Duration, Action, Duration) {
    let kind = if kind == Kind::Mix {
        allowed[rng.below(allowed.len())]
    } else {
        kind
    };
    let quiet = Duration::from_millis(rng.range(300, 1200));
    let lease_ms = lease.as_millis() as u64;
    let (action, hold) = match kind {
        Kind::Kill => (Action::Kill(rng.below(services)), rng.range(100, 800)),
        // Longer than the lease, by enough that another process takes the
        // claim over and finishes while the paused one still believes it
        // holds it (and then wakes up and completes, or tries to).
        Kind::Pause | Kind::Skew => (
            Action::Pause(rng.below(services)),
            rng.range(lease_ms + 1000, lease_ms + 3000),
        ),
        Kind::Net => match rng.below(5) {
            0 => (
                Action::Net(
                    Faults {
                        latency: Duration::from_millis(rng.range(50, 300)),
                        ..Faults::default()
                    },
                    "latency",
                ),
                rng.range(500, 2000),
            ),
            // Past the lease, so renewals cannot get through either.
            1 => (
                Action::Net(
                    Faults {
                        blackhole: true,
                        ..Faults::default()
                    },
                    "blackhole",
                ),
                rng.range(lease_ms + 500, lease_ms + 1500),
            ),
            2 => (Action::Reset, 0),
            3 => (
                Action::Net(
                    Faults {
                        refuse: true,
                        ..Faults::default()
                    },
                    "refuse",
                ),
                rng.range(300, 1000),
            ),
            _ => (
                Action::Net(
                    Faults {
                        lose_replies: 0.3,
                        ..Faults::default()
                    },
                    "lose replies",
                ),
                rng.range(500, 1500),
            ),
        },
        Kind::Restart => (Action::Restart, rng.range(200, 1000)),
        Kind::Failover => (
            Action::Failover {
                pick: rng.below(64),
                lossy: false,
            },
            0,
        ),
        // How long the master acknowledges writes its replica never sees.
        Kind::LossyFailover => (
            Action::Failover {
                pick: rng.below(64),
                lossy: true,
            },
            rng.range(500, 1500),
        ),
        Kind::None | Kind::Mix => (Action::Reset, 0),
    };
    (quiet, action, Duration::from_millis(hold))
}

/// A fault window, started now.
pub fn window(what: String) -> Fault {
    Fault {
        what,
        start_us: now_us(),
        end_us: 0,
    }
}
