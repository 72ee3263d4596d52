//! The lease keeper: one thread that keeps every claim held on a multi-threaded
//! runtime renewed, instead of a task per claim.
//!
//! A claim registers its lease ([`Kept::register`]: a lock, two map inserts, no
//! task and no wake-up in the common case) and unregisters when dropped. The
//! keeper thread sleeps until the earliest renewal is due, then spawns that
//! renewal onto the claim's own runtime (its store's connections are driven
//! there) from outside the runtime: the task lands in the runtime's shared
//! queue and wakes an idle worker, so a body that blocks its worker thread
//! cannot hold its own renewal back. A renewal that succeeds is due again a
//! third of the lease later; one that fails with a store error is retried after
//! a sixth (two more tries fit in the lease); [`Error::LeaseLost`](crate::Error::LeaseLost) ends it.
//!
//! The keeper keeps time by the OS clock, so on a current-thread runtime (where
//! tests pause Tokio's clock) claims keep a task of their own instead.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Condvar, LazyLock, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tracing::Instrument as _;

use super::lease::{interval, next_renewal};
use crate::key::Key;
use crate::store::{cap_duration, FencingToken, Store};

/// A lease the keeper renews until this is dropped.
#[derive(Debug)]
pub(crate) struct Kept {
    id: u64,
}

impl Kept {
    /// Registers `token`'s lease on `key` with the keeper; its renewals run on
    /// `runtime`. `None` if the keeper thread could not be started.
    pub(crate) fn register(
        runtime: Handle,
        store: Arc<dyn Store>,
        key: Key,
        token: FencingToken,
        lease: Duration,
    ) -> Option<Self> {
        let keeper = keeper()?;
        let entry = Entry {
            store,
            key,
            token,
            lease,
            runtime,
            span: tracing::Span::current(),
            renewing: None,
        };
        let due = due_in(interval(lease));
        let mut registry = keeper.lock();
        let id = registry.next_id;
        registry.next_id += 1;
        registry.leases.insert(id, entry);
        keeper.schedule(&mut registry, due, id);
        Some(Kept { id })
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        // A claim carried into a forked process: its registry is a copy.
        if !in_keeper_process() {
            return;
        }
        let mut registry = KEEPER.lock();
        if let Some(entry) = registry.leases.remove(&self.id) {
            match entry.renewing {
                // A renewal on the wire is cancelled, as the claim is settled.
                Some(Renewing::Now(task)) => task.abort(),
                Some(Renewing::Due(due)) => {
                    registry.queue.remove(&(due, self.id));
                }
                None => {}
            }
        }
    }
}

/// How long the keeper thread waits with nothing queued before it sleeps
/// until woken.
const LINGER: Duration = Duration::from_secs(1);

/// `pause` from now; a pause past any clock (a lease of `Duration::MAX`) is
/// capped to 100 years.
fn due_in(pause: Duration) -> Instant {
    Instant::now() + cap_duration(pause)
}

/// One registered lease.
struct Entry {
    store: Arc<dyn Store>,
    key: Key,
    token: FencingToken,
    lease: Duration,
    /// The claim's runtime: renewals are spawned there.
    runtime: Handle,
    /// The claim's span, so renewals log inside it.
    span: tracing::Span,
    /// `Due` while waiting in the queue, `Now` while a renewal runs.
    renewing: Option<Renewing>,
}

enum Renewing {
    Due(Instant),
    Now(tokio::task::AbortHandle),
}

#[derive(Default)]
struct Registry {
    next_id: u64,
    leases: HashMap<u64, Entry>,
    /// Renewals by the time they are due.
    queue: BTreeSet<(Instant, u64)>,
    /// When the keeper thread wakes next (`None`: only when woken). A renewal
    /// due later needs no wake-up: the thread finds it then. (Claims with the
    /// same lease are due in the order they came, so a steady stream of them
    /// wakes the thread once per renewal interval, not once per claim.)
    wakes_at: Option<Instant>,
}

struct Keeper {
    registry: Mutex<Registry>,
    /// Wakes the keeper thread when a renewal is due sooner than it planned.
    earlier: Condvar,
}

static KEEPER: LazyLock<Keeper> = LazyLock::new(|| Keeper {
    registry: Mutex::new(Registry::default()),
    earlier: Condvar::new(),
});

/// The process that started the keeper thread; `None` if it could not start.
static STARTED: OnceLock<Option<u32>> = OnceLock::new();

/// The keeper, its thread started on first use; `None` if it could not start,
/// or in a process forked after it started (which has no keeper thread, and
/// may have inherited the registry locked): claims there keep a task each.
fn keeper() -> Option<&'static Keeper> {
    let pid = (*STARTED.get_or_init(|| {
        let pid = std::process::id();
        let spawned = std::thread::Builder::new()
            .name("idem-lease-keeper".into())
            .spawn(|| KEEPER.run());
        match spawned {
            Ok(_) => Some(pid),
            Err(err) => {
                tracing::error!(error = %err, "could not start the lease keeper thread; leases are renewed by a task per claim");
                None
            }
        }
    }))?;
    (pid == std::process::id()).then(|| &*KEEPER)
}

/// Whether this is the process the keeper thread runs in: a registry copied
/// into a forked process is served by nobody and may have been copied locked,
/// so there it is never touched.
fn in_keeper_process() -> bool {
    STARTED.get().copied().flatten() == Some(std::process::id())
}

impl Keeper {
    fn lock(&self) -> MutexGuard<'_, Registry> {
        // Nothing panics while the registry is locked; should something, the
        // maps are still consistent (every change is one insert or remove).
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `id`'s next renewal at `due`, waking the thread if it would
    /// otherwise wake too late.
    fn schedule(&self, registry: &mut Registry, due: Instant, id: u64) {
        registry.queue.insert((due, id));
        if let Some(entry) = registry.leases.get_mut(&id) {
            entry.renewing = Some(Renewing::Due(due));
        }
        if registry.wakes_at.is_none_or(|wake| due < wake) {
            registry.wakes_at = Some(due);
            self.earlier.notify_one();
        }
    }

    /// The keeper thread: spawns each renewal when it is due.
    fn run(&'static self) {
        let mut registry = self.lock();
        let mut idle = false;
        loop {
            let now = Instant::now();
            while let Some(&(due, id)) = registry.queue.first() {
                if due > now {
                    break;
                }
                registry.queue.pop_first();
                let Some(entry) = registry.leases.get_mut(&id) else {
                    continue;
                };
                let renewal = renew(
                    self,
                    id,
                    Arc::clone(&entry.store),
                    entry.key.clone(),
                    entry.token,
                    entry.lease,
                )
                .instrument(entry.span.clone());
                let task = entry.runtime.spawn(renewal).abort_handle();
                entry.renewing = Some(Renewing::Now(task));
            }
            // The spawns above may have taken a while: plan the wait from now.
            let now = Instant::now();
            // With nothing queued the thread lingers once before it sleeps
            // until woken: claims that come and go faster than it wakes
            // (most of them) then wake it once per linger, not once each.
            registry.wakes_at = match registry.queue.first() {
                Some(&(due, _)) => {
                    idle = false;
                    Some(due)
                }
                None if !idle => {
                    idle = true;
                    Some(now + LINGER)
                }
                None => None,
            };
            registry = match registry.wakes_at {
                Some(due) => {
                    let wait = due.saturating_duration_since(now);
                    self.earlier
                        .wait_timeout(registry, wait)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
                None => self
                    .earlier
                    .wait(registry)
                    .unwrap_or_else(PoisonError::into_inner),
            };
        }
    }
}

/// One renewal, on the claim's runtime; schedules the next one.
async fn renew(
    keeper: &'static Keeper,
    id: u64,
    store: Arc<dyn Store>,
    key: Key,
    token: FencingToken,
    lease: Duration,
) {
    let renewal = CatchPanic(Box::pin(async {
        store.renew(key.as_str(), token, lease).await
    }));
    let next = match renewal.await {
        Err(()) => {
            // A store whose renewal panicked may answer the next one.
            tracing::error!(token = token.0, "lease renewal panicked; retrying");
            Some(interval(lease) / 2)
        }
        Ok(renewed) => next_renewal(renewed, token, lease),
    };
    if !in_keeper_process() {
        return;
    }
    let mut registry = keeper.lock();
    match next {
        // Unless the claim was settled meanwhile (its entry is gone).
        Some(pause) if registry.leases.contains_key(&id) => {
            keeper.schedule(&mut registry, due_in(pause), id);
        }
        Some(_) => {}
        None => {
            registry.leases.remove(&id);
        }
    }
}

/// A future whose panic is caught and answered as `Err(())`, so a store that
/// panics in `renew` does not end the renewals of its claim.
struct CatchPanic<F>(Pin<Box<F>>);

impl<F: Future> Future for CatchPanic<F> {
    type Output = Result<F::Output, ()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.0.as_mut();
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Ready(out)) => Poll::Ready(Ok(out)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(_) => Poll::Ready(Err(())),
        }
    }
}
