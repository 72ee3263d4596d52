//! Steps inside an idempotent call (`idem_runtime::step`): each runs once per
//! logical call; an attempt that follows one that failed, was cancelled,
//! panicked or lapsed replays the recorded steps and runs the first one that
//! is not; a body that is not deterministic, or a step misused, gets a clear
//! error; a fenced-out holder cannot record.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem_runtime::{
    async_trait, current, idempotent, step, Claim, ClaimRequest, Error, FencingToken, Key,
    MemoryStore, Record, Step, Store,
};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};

use crate::{AppError, FaultyStore};

/// What a step does when it is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Returns an error (not recorded; the call releases its claim).
    Fail,
    /// Never finishes (the caller gives up: a cancellation).
    Hang,
    /// Panics.
    Panic,
}

/// Effects the steps made, by step name: what a downstream system would see.
#[derive(Default)]
struct Effects(Mutex<BTreeMap<&'static str, usize>>);

impl Effects {
    fn make(&self, name: &'static str) -> usize {
        let mut effects = self.0.lock().unwrap();
        let n = effects.entry(name).or_default();
        *n += 1;
        *n
    }
    fn count(&self, name: &str) -> usize {
        self.0.lock().unwrap().get(name).copied().unwrap_or(0)
    }
}

const STEPS: [&str; 4] = ["reserve", "charge", "ship", "mail"];

#[derive(Default)]
struct Checkout {
    store: FaultyStore,
    effects: Effects,
    /// The fault the next attempt meets, and at which step.
    fault: Mutex<Option<(&'static str, Fault)>>,
    /// `current().took_over()` of every attempt that ran.
    took_over: Mutex<Vec<bool>>,
}

impl Checkout {
    #[idempotent(key = order, name = "steps-checkout", lease = "1s", ttl = "60s", store = self.store)]
    async fn checkout(&self, order: u64) -> Result<String, AppError> {
        let attempt = current().expect("inside the body");
        self.took_over.lock().unwrap().push(attempt.took_over());
        let mut done = Vec::new();
        for name in STEPS {
            done.push(step(name, self.effect(name, order)).await?);
        }
        Ok(done.join("/"))
    }

    async fn effect(&self, name: &'static str, order: u64) -> Result<String, AppError> {
        let fault = {
            let mut fault = self.fault.lock().unwrap();
            match *fault {
                Some((at, what)) if at == name => fault.take().map(|_| what),
                _ => None,
            }
        };
        match fault {
            Some(Fault::Fail) => return Err(AppError::Unavailable),
            Some(Fault::Hang) => std::future::pending::<()>().await,
            Some(Fault::Panic) => panic!("step {name} panicked (on purpose)"),
            None => {}
        }
        let n = self.effects.make(name);
        Ok(format!("{name}-{order}-{n}"))
    }

    fn key(order: u64) -> Key {
        Key::derive("steps-checkout", &order).unwrap()
    }

    fn expected(order: u64) -> String {
        STEPS.map(|s| format!("{s}-{order}-1")).join("/")
    }

    fn assert_each_once(&self) {
        for name in STEPS {
            assert_eq!(self.effects.count(name), 1, "{name} ran once");
        }
    }
}

/// Runs one attempt that meets `fault` at step `at`, as its caller sees it.
async fn attempt_with(c: &Arc<Checkout>, order: u64, at: &'static str, fault: Fault) {
    *c.fault.lock().unwrap() = Some((at, fault));
    match fault {
        Fault::Fail => {
            let out = c.checkout(order).await;
            assert!(matches!(out, Err(AppError::Unavailable)), "{out:?}");
        }
        Fault::Hang => {
            let out = tokio::time::timeout(Duration::from_millis(50), c.checkout(order)).await;
            assert!(out.is_err(), "the caller gave up");
        }
        Fault::Panic => {
            let c = Arc::clone(c);
            let out = tokio::spawn(async move { c.checkout(order).await }).await;
            assert!(out.unwrap_err().is_panic());
        }
    }
    // A dropped claim is released by a task of its own (this store cannot
    // release synchronously): let it land before the retry.
    let key = Checkout::key(order);
    while c.store.get(key.as_str()).await.unwrap().is_some() {
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn a_retry_resumes_at_the_step_that_did_not_finish_whatever_stopped_it() {
    for fault in [Fault::Fail, Fault::Hang, Fault::Panic] {
        for (i, at) in STEPS.into_iter().enumerate() {
            let c = Arc::new(Checkout::default());
            attempt_with(&c, 7, at, fault).await;
            for name in &STEPS[..i] {
                assert_eq!(c.effects.count(name), 1, "{fault:?} at {at}: {name} ran");
            }
            assert_eq!(
                c.effects.count(at),
                0,
                "{fault:?} at {at}: {at} did not finish"
            );
            let out = c.checkout(7).await.unwrap();
            assert_eq!(out, Checkout::expected(7), "{fault:?} at {at}");
            c.assert_each_once();
            // The attempt after one that recorded steps knows it resumed.
            assert_eq!(
                *c.took_over.lock().unwrap(),
                vec![false, i > 0],
                "{fault:?} at {at}"
            );
            // Then the outcome replays; the steps are gone with the completion.
            assert_eq!(c.checkout(7).await.unwrap(), out);
            assert_eq!(c.took_over.lock().unwrap().len(), 2);
            let key = Checkout::key(7);
            assert!(c.store.steps(key.as_str(), None).await.unwrap().is_empty());
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_takeover_after_a_lapsed_lease_replays_the_steps_its_holder_recorded() {
    let c = Checkout::default();
    let key = Checkout::key(8);
    // A holder that recorded two steps, then died: nothing renews its lease.
    let store: &dyn Store = &c.store;
    let token = match store
        .claim(ClaimRequest {
            key: key.as_str(),
            fingerprint: None,
            lease: Duration::from_secs(1),
        })
        .await
        .unwrap()
    {
        idem_runtime::Claim::Acquired { token, .. } => token,
        other => panic!("{other:?}"),
    };
    for (at, name) in STEPS[..2].iter().enumerate() {
        let value = idem_runtime::codec::encode_ok(&format!("{name}-8-1")).unwrap();
        let id = serde_json::to_string(name).unwrap();
        store
            .record_step(
                key.as_str(),
                token,
                &Step::new(at as u32, id, value),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
    }
    assert!(matches!(
        c.checkout(8).await,
        Err(AppError::Idem(Error::InProgress { .. }))
    ));
    tokio::time::advance(Duration::from_millis(1_100)).await;
    assert_eq!(c.checkout(8).await.unwrap(), Checkout::expected(8));
    assert_eq!(
        c.effects.count("reserve"),
        0,
        "recorded by the dead holder: replayed"
    );
    assert_eq!(c.effects.count("charge"), 0);
    assert_eq!(c.effects.count("ship"), 1);
    assert_eq!(c.effects.count("mail"), 1);
    assert_eq!(*c.took_over.lock().unwrap(), vec![true]);
}

#[tokio::test(start_paused = true)]
async fn a_fenced_out_holder_cannot_record_its_step() {
    let c = Arc::new(Checkout::default());
    let gate = Arc::new(tokio::sync::Notify::new());
    // Holder A stalls inside "ship" while its renewals fail (a partition).
    let first = {
        let (c, gate) = (Arc::clone(&c), Arc::clone(&gate));
        tokio::spawn(async move { c.checkout_gated(9, gate).await })
    };
    tokio::task::yield_now().await;
    while c.effects.count("charge") == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Renewals stay failing: a renewal that landed after the lapse, before
    // B's claim, would keep A's claim alive.
    c.store.renewals_fail.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    // B takes the call over: the two recorded steps replay, B ships and mails.
    let second = c.checkout(9).await.unwrap();
    assert_eq!(c.effects.count("reserve"), 1);
    assert_eq!(c.effects.count("charge"), 1);
    // A wakes up: its "ship" ran, but it cannot record it, nor complete.
    gate.notify_one();
    let first = first.await.unwrap();
    assert!(
        matches!(first, Err(AppError::Idem(Error::LeaseLost))),
        "{first:?}"
    );
    assert_eq!(c.checkout(9).await.unwrap(), second, "B's outcome stands");
    assert_eq!(c.effects.count("mail"), 1, "A never reached mail");
}

impl Checkout {
    /// `checkout`, but the first time "ship" is reached it waits for `gate`.
    #[idempotent(key = order, name = "steps-checkout", lease = "1s", ttl = "60s", store = self.store)]
    async fn checkout_gated(
        &self,
        order: u64,
        gate: Arc<tokio::sync::Notify>,
    ) -> Result<String, AppError> {
        self.took_over
            .lock()
            .unwrap()
            .push(current().unwrap().took_over());
        let mut done = Vec::new();
        for name in STEPS {
            if name == "ship" {
                let gate = Arc::clone(&gate);
                done.push(
                    step(name, async move {
                        gate.notified().await;
                        self.effect(name, order).await
                    })
                    .await?,
                );
            } else {
                done.push(step(name, self.effect(name, order)).await?);
            }
        }
        Ok(done.join("/"))
    }
}

/// A body whose steps depend on something outside the call: not deterministic.
#[derive(Default)]
struct Fickle {
    store: FaultyStore,
    /// The steps the next attempt calls, in order, and whether it fails after them.
    plan: Mutex<(Vec<&'static str>, bool)>,
    runs: Mutex<Vec<&'static str>>,
}

impl Fickle {
    #[idempotent(key = order, name = "steps-fickle", store = self.store)]
    async fn run(&self, order: u64) -> Result<Vec<u32>, AppError> {
        let (names, fail) = self.plan.lock().unwrap().clone();
        let mut out = Vec::new();
        for name in names {
            out.push(
                step(name, async {
                    self.runs.lock().unwrap().push(name);
                    Ok::<_, AppError>(order as u32)
                })
                .await?,
            );
        }
        if fail {
            return Err(AppError::Unavailable);
        }
        Ok(out)
    }

    fn plan(&self, names: &[&'static str], fail: bool) {
        *self.plan.lock().unwrap() = (names.to_vec(), fail);
    }
}

#[tokio::test]
async fn a_retry_that_calls_other_steps_gets_a_clear_error_not_a_wrong_replay() {
    let f = Fickle::default();
    f.plan(&["a", "b"], true);
    assert!(matches!(f.run(1).await, Err(AppError::Unavailable)));
    // Another step where "a" was recorded.
    f.plan(&["b", "a"], false);
    match f.run(1).await {
        Err(AppError::Idem(err @ Error::StepMismatch { .. })) => {
            let Error::StepMismatch {
                at,
                recorded,
                called,
            } = &err
            else {
                unreachable!()
            };
            assert_eq!(
                (*at, recorded.as_str(), called.as_str()),
                (0, "\"a\"", "called \"b\"")
            );
            let message = err.to_string();
            assert!(
                message.contains("same steps in the same order"),
                "{message}"
            );
            assert!(!err.is_retryable());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        *f.runs.lock().unwrap(),
        vec!["a", "b"],
        "nothing ran on the mismatch"
    );
    // Returning before a recorded step: the outcome is not recorded either.
    f.plan(&["a"], false);
    match f.run(1).await {
        Err(AppError::Idem(Error::StepMismatch {
            at: 1,
            recorded,
            called,
        })) => {
            assert_eq!(
                (recorded.as_str(), called.as_str()),
                ("\"b\"", "returned first")
            );
        }
        other => panic!("{other:?}"),
    }
    // The steps are still kept: the body that recorded them resumes.
    f.plan(&["a", "b", "c"], false);
    assert_eq!(f.run(1).await.unwrap(), vec![1, 1, 1]);
    assert_eq!(
        *f.runs.lock().unwrap(),
        vec!["a", "b", "c"],
        "a and b replayed"
    );
}

#[tokio::test]
async fn steps_are_refused_where_they_cannot_be_recorded() {
    // Outside any call.
    let out: Result<u8, Error> = step("alone", async { Ok(1) }).await;
    assert!(
        matches!(out, Err(Error::StepMisuse(ref why)) if why.contains("inside an idempotent call")),
        "{out:?}"
    );

    let f = Fickle::default();
    // The same id twice in one call.
    f.plan(&["a", "a"], false);
    match f.run(2).await {
        Err(AppError::Idem(Error::StepMisuse(why))) => {
            assert!(why.contains("needs an index"), "{why}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(*f.runs.lock().unwrap(), vec!["a"]);
}

struct Nested {
    store: FaultyStore,
}

impl Nested {
    #[idempotent(key = order, name = "steps-nested", store = self.store)]
    async fn run(&self, order: u64) -> Result<u64, AppError> {
        step("outer", async {
            step("inner", async { Ok::<_, AppError>(order) }).await
        })
        .await
    }

    /// An idempotent call inside a step has steps of its own.
    #[idempotent(key = order, name = "steps-inner-call", store = self.store)]
    async fn inner_call(&self, order: u64) -> Result<u64, AppError> {
        step("only", async { Ok::<_, AppError>(order + 1) }).await
    }

    #[idempotent(key = order, name = "steps-outer-call", store = self.store)]
    async fn outer_call(&self, order: u64) -> Result<u64, AppError> {
        step("call", self.inner_call(order)).await
    }
}

#[tokio::test]
async fn steps_do_not_nest_but_a_call_inside_a_step_has_its_own() {
    let n = Nested {
        store: FaultyStore::default(),
    };
    match n.run(3).await {
        Err(AppError::Idem(Error::StepMisuse(why))) => {
            assert!(why.contains("one at a time"), "{why}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(n.outer_call(3).await.unwrap(), 4);
}

#[derive(Default)]
struct Shipments {
    store: FaultyStore,
    shipped: Mutex<Vec<usize>>,
    fail_at: Mutex<Option<usize>>,
}

impl Shipments {
    #[idempotent(key = order, name = "steps-loop", store = self.store)]
    async fn ship_all(&self, order: u64, items: usize) -> Result<Vec<String>, AppError> {
        let mut labels = Vec::new();
        for i in 0..items {
            labels.push(
                step(("ship", i), async move {
                    if *self.fail_at.lock().unwrap() == Some(i) {
                        *self.fail_at.lock().unwrap() = None;
                        return Err(AppError::Unavailable);
                    }
                    self.shipped.lock().unwrap().push(i);
                    Ok(format!("{order}-{i}"))
                })
                .await?,
            );
        }
        Ok(labels)
    }
}

#[tokio::test]
async fn a_loop_of_indexed_steps_resumes_at_the_item_that_failed() {
    let s = Shipments::default();
    *s.fail_at.lock().unwrap() = Some(3);
    assert!(matches!(s.ship_all(5, 6).await, Err(AppError::Unavailable)));
    let labels = s.ship_all(5, 6).await.unwrap();
    assert_eq!(labels, (0..6).map(|i| format!("5-{i}")).collect::<Vec<_>>());
    assert_eq!(*s.shipped.lock().unwrap(), vec![0, 1, 2, 3, 4, 5]);
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Charge {
    id: String,
    cents: i64,
    ratio: f64,
}

struct Values {
    store: FaultyStore,
    runs: Mutex<usize>,
    fail: Mutex<bool>,
}

impl Values {
    #[idempotent(key = order, name = "steps-values", store = self.store)]
    async fn run(&self, order: u64, ratio: f64) -> Result<Charge, AppError> {
        let charge = step("charge", async {
            *self.runs.lock().unwrap() += 1;
            Ok::<_, AppError>(Charge {
                id: format!("ch_{order}"),
                cents: i64::MIN,
                ratio,
            })
        })
        .await?;
        if std::mem::take(&mut *self.fail.lock().unwrap()) {
            return Err(AppError::Unavailable);
        }
        Ok(charge)
    }
}

#[tokio::test]
async fn a_step_value_replays_exactly_and_one_json_cannot_hold_is_refused() {
    let v = Values {
        store: FaultyStore::default(),
        runs: Mutex::new(0),
        fail: Mutex::new(true),
    };
    assert!(v.run(1, 0.1 + 0.2).await.is_err());
    let charge = v.run(1, 0.1 + 0.2).await.unwrap();
    assert_eq!(charge.ratio.to_bits(), (0.1f64 + 0.2).to_bits());
    assert_eq!(charge.cents, i64::MIN);
    assert_eq!(*v.runs.lock().unwrap(), 1);
    // NaN cannot be stored faithfully: the step's call fails, nothing recorded.
    match v.run(2, f64::NAN).await {
        Err(AppError::Idem(Error::Codec(_))) => {}
        other => panic!("{other:?}"),
    }
    let key = Key::derive("steps-values", &2u64).unwrap();
    assert!(v.store.steps(key.as_str(), None).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_step_the_store_cannot_record_fails_the_call_after_three_tries() {
    let c = Checkout::default();
    c.store.steps_fail.store(true, Ordering::SeqCst);
    match c.checkout(10).await {
        Err(AppError::Idem(Error::Store(_))) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(c.store.steps_recorded.load(Ordering::SeqCst), 3);
    assert_eq!(
        c.effects.count("reserve"),
        1,
        "the effect happened, unrecorded"
    );
    c.store.steps_fail.store(false, Ordering::SeqCst);
    // The retry runs it again (the documented limit: make it idempotent downstream).
    assert!(c.checkout(10).await.is_ok());
    assert_eq!(c.effects.count("reserve"), 2);
}

#[tokio::test(start_paused = true)]
async fn steps_are_kept_for_the_calls_ttl_then_forgotten() {
    let c = Arc::new(Checkout::default());
    attempt_with(&c, 11, "ship", Fault::Fail).await;
    let key = Checkout::key(11);
    assert_eq!(c.store.steps(key.as_str(), None).await.unwrap().len(), 2);
    tokio::time::advance(Duration::from_secs(61)).await;
    assert!(c.store.steps(key.as_str(), None).await.unwrap().is_empty());
    assert_eq!(
        c.store.purge_expired(100).await.unwrap(),
        1,
        "the released record goes"
    );
    // A call after the ttl is a new call: every step runs again.
    c.checkout(11).await.unwrap();
    assert_eq!(c.effects.count("reserve"), 2);
    assert_eq!(c.effects.count("mail"), 1);
    assert_eq!(*c.took_over.lock().unwrap(), vec![false, false]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_concurrent_retries_of_a_resumed_call_run_its_remaining_steps_once() {
    let c = Arc::new(Waiting::default());
    *c.inner.fault.lock().unwrap() = Some(("ship", Fault::Fail));
    assert!(c.checkout(12).await.is_err());
    let calls: Vec<_> = (0..64)
        .map(|_| {
            let c = Arc::clone(&c);
            tokio::spawn(async move { c.checkout(12).await.unwrap() })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap(), Checkout::expected(12));
    }
    c.inner.assert_each_once();
}

#[derive(Default)]
struct Waiting {
    inner: Checkout,
}

impl Waiting {
    #[idempotent(key = order, name = "steps-waiting", in_progress = wait("30s"), store = self.inner.store)]
    async fn checkout(&self, order: u64) -> Result<String, AppError> {
        let mut done = Vec::new();
        for name in STEPS {
            done.push(step(name, self.inner.effect(name, order)).await?);
        }
        Ok(done.join("/"))
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Whatever stops each attempt, and wherever, once one finishes every step
    /// ran exactly once and every caller after it gets the same outcome.
    #[test]
    fn any_sequence_of_interrupted_attempts_runs_each_step_once(
        faults in proptest::collection::vec((0usize..4, 0usize..3), 0..6),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let c = Arc::new(Checkout::default());
            let mut recorded = 0usize;
            for (at, kind) in faults {
                let fault = [Fault::Fail, Fault::Hang, Fault::Panic][kind];
                // A fault at a step already recorded is never reached.
                if at < recorded {
                    continue;
                }
                attempt_with(&c, 13, STEPS[at], fault).await;
                recorded = at;
            }
            let out = c.checkout(13).await.unwrap();
            assert_eq!(out, Checkout::expected(13));
            c.assert_each_once();
            assert_eq!(c.checkout(13).await.unwrap(), out);
        });
    }
}

// Found by the break-it review of steps (each failed before its fix).

/// A store written before steps: every method but the step ones forwarded.
#[derive(Clone, Default)]
struct NoSteps(MemoryStore);

#[async_trait]
impl Store for NoSteps {
    async fn claim(&self, request: ClaimRequest<'_>) -> Result<Claim, Error> {
        self.0.claim(request).await
    }
    async fn complete(
        &self,
        key: &str,
        token: FencingToken,
        outcome: &[u8],
        ttl: Duration,
    ) -> Result<(), Error> {
        self.0.complete(key, token, outcome, ttl).await
    }
    async fn release(&self, key: &str, token: FencingToken) -> Result<(), Error> {
        self.0.release(key, token).await
    }
    async fn renew(&self, key: &str, token: FencingToken, lease: Duration) -> Result<(), Error> {
        self.0.renew(key, token, lease).await
    }
    async fn get(&self, key: &str) -> Result<Option<Record>, Error> {
        self.0.get(key).await
    }
    async fn purge_expired(&self, batch: usize) -> Result<u64, Error> {
        self.0.purge_expired(batch).await
    }
    fn handle(&self) -> Arc<dyn Store> {
        Arc::new(self.clone())
    }
}

struct Pay {
    store: NoSteps,
    charges: AtomicUsize,
}

impl Pay {
    #[idempotent(key = order, store = self.store)]
    async fn pay(&self, order: u64) -> Result<u32, AppError> {
        step("charge", async {
            self.charges.fetch_add(1, Ordering::SeqCst);
            Ok::<_, AppError>(1999u32)
        })
        .await
    }
}

#[tokio::test]
async fn on_a_store_that_does_not_keep_steps_a_step_is_refused_before_its_work() {
    let p = Pay {
        store: NoSteps::default(),
        charges: AtomicUsize::new(0),
    };
    for _ in 0..3 {
        match p.pay(1).await {
            Err(AppError::Idem(Error::StepMisuse(why))) => {
                assert!(why.contains("does not keep steps"), "{why}")
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(p.charges.load(Ordering::SeqCst), 0, "the work never ran");
}

struct Both {
    store: MemoryStore,
    a_runs: AtomicUsize,
    b_runs: AtomicUsize,
    /// Delay before branch a / branch b reaches its step, per attempt.
    delays: std::sync::Mutex<Vec<(u64, u64, bool)>>,
}

impl Both {
    #[idempotent(key = order, store = self.store, lease = "10s", ttl = "60s")]
    async fn run(&self, order: u64) -> Result<String, AppError> {
        let (da, db, fail_a) = self.delays.lock().unwrap().remove(0);
        let a = async {
            tokio::time::sleep(Duration::from_millis(da)).await;
            step("a", async {
                if fail_a {
                    return Err(AppError::Unavailable);
                }
                self.a_runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, AppError>("a".to_string())
            })
            .await
        };
        let b = async {
            tokio::time::sleep(Duration::from_millis(db)).await;
            step("b", async {
                self.b_runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, AppError>("b".to_string())
            })
            .await
        };
        let (a, b) = tokio::join!(a, b);
        Ok(format!("{}{}", a?, b?))
    }
}

/// Branches of a `join!` whose steps start in another order on the resumed
/// attempt: a recorded step is never run again (it meets its own record at
/// another position: a mismatch, before its work), and once the order is
/// the recorded one again the call resumes.
#[tokio::test(start_paused = true)]
async fn a_step_recorded_at_another_position_is_refused_not_run_again() {
    let both = Both {
        store: MemoryStore::new(),
        a_runs: AtomicUsize::new(0),
        b_runs: AtomicUsize::new(0),
        // Attempt 1: a starts first (position 0) and fails; b (position 1) is recorded.
        // Attempt 2: b starts first (position 0), a second.
        // Attempt 3: the order of attempt 1.
        delays: std::sync::Mutex::new(vec![(0, 20, true), (20, 0, false), (0, 20, false)]),
    };
    assert!(both.run(1).await.is_err());
    // Both branches meet b's record (b at another position, a at b's): the
    // body answers with its first branch's error.
    match both.run(1).await {
        Err(AppError::Idem(Error::StepMismatch {
            at: 1,
            recorded,
            called,
        })) => {
            assert_eq!(
                (recorded.as_str(), called.as_str()),
                ("\"b\"", "called \"a\"")
            )
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(both.run(1).await.unwrap(), "ab");
    assert_eq!(both.b_runs.load(Ordering::SeqCst), 1, "b ran once");
    assert_eq!(both.a_runs.load(Ordering::SeqCst), 1);
}

struct Overlap {
    store: MemoryStore,
    runs: AtomicUsize,
}

impl Overlap {
    #[idempotent(key = order, store = self.store)]
    async fn run(&self, order: u64) -> Result<u64, AppError> {
        let slow = step("slow", async {
            tokio::task::yield_now().await;
            self.runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, AppError>(order)
        });
        let quick = step("quick", async {
            self.runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, AppError>(order)
        });
        let (slow, quick) = tokio::join!(slow, quick);
        Ok(slow? + quick?)
    }
}

/// Steps of one call run one at a time: one started while another runs is
/// refused before its work (its position would depend on timing).
#[tokio::test]
async fn a_step_started_while_another_runs_is_refused() {
    let o = Overlap {
        store: MemoryStore::new(),
        runs: AtomicUsize::new(0),
    };
    match o.run(1).await {
        Err(AppError::Idem(Error::StepMisuse(why))) => {
            assert!(why.contains("one at a time"), "{why}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(o.runs.load(Ordering::SeqCst), 1, "only the first step ran");
}

#[derive(Debug, Serialize, Deserialize)]
enum Fails {
    Internal(String),
    Down,
}

impl From<Error> for Fails {
    fn from(e: Error) -> Self {
        Fails::Internal(e.to_string())
    }
}

struct Flip {
    store: MemoryStore,
    first: std::sync::atomic::AtomicBool,
    runs: AtomicUsize,
}

impl Flip {
    #[idempotent(key = order, store = self.store, cache_errors)]
    async fn run(&self, order: u64) -> Result<u32, Fails> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        if self.first.swap(false, Ordering::SeqCst) {
            step("reserve", async { Ok::<_, Fails>(1u32) }).await?;
            // A transient failure after the step: not final, but cache_errors
            // caches every error; use a panic to release instead.
            panic!("crash after reserve");
        }
        // A changed body: another step at position 0.
        step("charge", async { Ok::<_, Fails>(2u32) }).await
    }
}

/// An error type that carries idem's errors, with `cache_errors`: a step
/// mismatch is still not recorded as the call's outcome; the claim is
/// released with its steps kept, and every retry meets the mismatch again.
#[tokio::test]
async fn a_step_mismatch_is_never_cached_even_with_cache_errors() {
    let flip = Arc::new(Flip {
        store: MemoryStore::new(),
        first: std::sync::atomic::AtomicBool::new(true),
        runs: AtomicUsize::new(0),
    });
    let f = Arc::clone(&flip);
    let crashed = tokio::spawn(async move { f.run(5).await }).await;
    assert!(crashed.unwrap_err().is_panic());
    for _ in 0..2 {
        match flip.run(5).await {
            Err(Fails::Internal(why)) => {
                assert!(why.contains("same steps in the same order"), "{why}")
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        flip.runs.load(Ordering::SeqCst),
        3,
        "never a replay of the mismatch"
    );
}

/// A message handler that returns before a step an earlier delivery recorded
/// is not acknowledged as processed: nothing was recorded.
#[tokio::test]
async fn a_deduplicator_does_not_acknowledge_a_handler_that_skipped_a_recorded_step() {
    use idem_runtime::message::{Deduplicator, ProcessError};
    let dedup = Deduplicator::new(MemoryStore::new(), "steps-skipped");
    let first = dedup
        .process("m-1", || async {
            step("a", async { Ok::<_, Error>(1u32) }).await?;
            Err::<(), Error>(Error::StepMisuse("down".into()))
        })
        .await;
    assert!(matches!(first, Err(ProcessError::Handler(_))));
    for _ in 0..2 {
        match dedup.process("m-1", || async { Ok::<_, Error>(()) }).await {
            Err(ProcessError::Idempotency(Error::StepMismatch { at: 0, .. })) => {}
            other => panic!("{:?}", other.map(|_| ()).map_err(|e| format!("{e:?}"))),
        }
    }
}

struct Paused {
    store: FaultyStore,
    charges: AtomicUsize,
    /// Attempts wait here before their first step, while set.
    gate: Mutex<Option<Arc<tokio::sync::Notify>>>,
    fail: std::sync::atomic::AtomicBool,
}

impl Paused {
    #[idempotent(key = order, name = "steps-paused", lease = "600ms", ttl = "60s", store = self.store)]
    async fn pay(&self, order: u64) -> Result<usize, AppError> {
        let gate = self.gate.lock().unwrap().take();
        if let Some(gate) = gate {
            gate.notified().await;
        }
        let charge = step("charge", async {
            Ok::<_, AppError>(self.charges.fetch_add(1, Ordering::SeqCst) + 1)
        })
        .await?;
        if self.fail.swap(false, Ordering::SeqCst) {
            return Err(AppError::Unavailable);
        }
        Ok(charge)
    }
}

/// Found by the second break-it review: an attempt that resumes recorded
/// steps, then stalls past its lease before its first step while another
/// attempt finishes the call, must not run a recorded step again (it reads
/// the steps as their holder, and is told it no longer is).
#[tokio::test(start_paused = true)]
async fn a_resumed_attempt_taken_over_before_its_first_step_never_reruns_a_recorded_one() {
    let p = Arc::new(Paused {
        store: FaultyStore::default(),
        charges: AtomicUsize::new(0),
        gate: Mutex::new(None),
        fail: std::sync::atomic::AtomicBool::new(true),
    });
    assert!(matches!(p.pay(1).await, Err(AppError::Unavailable)));
    // A resumes (the charge is recorded) and stalls before its first step,
    // its renewals failing, past its lease.
    let gate = Arc::new(tokio::sync::Notify::new());
    *p.gate.lock().unwrap() = Some(Arc::clone(&gate));
    p.store.renewals_fail.store(true, Ordering::SeqCst);
    let a = tokio::spawn({
        let p = Arc::clone(&p);
        async move { p.pay(1).await }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    // B takes over, replays the charge and completes the call.
    assert_eq!(p.pay(1).await.unwrap(), 1);
    gate.notify_one();
    match a.await.unwrap() {
        Err(AppError::Idem(Error::LeaseLost)) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(
        p.charges.load(Ordering::SeqCst),
        1,
        "the recorded charge never ran again"
    );
}

/// `on_takeover`: what a call does when it continues an unfinished attempt.
#[derive(Default)]
struct Policies {
    store: FaultyStore,
    runs: AtomicUsize,
    reconciled: AtomicUsize,
    /// The reconciliation's answer: found the earlier charge, or not yet.
    settled: std::sync::atomic::AtomicBool,
    fail_once: std::sync::atomic::AtomicBool,
}

impl Policies {
    #[idempotent(key = order, name = "takeover-fail", ttl = "60s", on_takeover = fail, store = self.store)]
    async fn strict(&self, order: u64) -> Result<usize, AppError> {
        self.body(order).await
    }

    #[idempotent(
        key = order,
        name = "takeover-reconcile",
        ttl = "60s",
        on_takeover = reconcile(|attempt: &idem_runtime::Attempt| self.reconcile(attempt.clone())),
        store = self.store
    )]
    async fn reconciled(&self, order: u64) -> Result<usize, AppError> {
        self.body(order).await
    }

    async fn body(&self, order: u64) -> Result<usize, AppError> {
        let n = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        step("charge", async { Ok::<_, AppError>(order) }).await?;
        if self.fail_once.swap(false, Ordering::SeqCst) {
            return Err(AppError::Unavailable);
        }
        Ok(n)
    }

    async fn reconcile(&self, attempt: idem_runtime::Attempt) -> Result<(), AppError> {
        assert!(attempt.took_over());
        self.reconciled.fetch_add(1, Ordering::SeqCst);
        if self.settled.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(AppError::Declined(
                "the earlier charge is not settled yet".into(),
            ))
        }
    }
}

/// `on_takeover = fail`: a call that continues an attempt that recorded a
/// step and failed is refused, and stays refused on every retry (a kept
/// mark), until the call's ttl has passed.
#[tokio::test(start_paused = true)]
async fn on_takeover_fail_refuses_every_retry_of_an_unfinished_call() {
    let p = Policies::default();
    p.fail_once.store(true, Ordering::SeqCst);
    assert!(matches!(p.strict(1).await, Err(AppError::Unavailable)));
    for _ in 0..3 {
        match p.strict(1).await {
            Err(AppError::Idem(err @ Error::TakenOver)) => {
                assert!(err.to_string().contains("reconcile"), "{err}");
                assert!(!err.is_retryable());
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(p.runs.load(Ordering::SeqCst), 1, "the body never ran again");
    tokio::time::advance(Duration::from_secs(61)).await;
    assert_eq!(p.strict(1).await.unwrap(), 2, "after the ttl: a new call");
    // A call that finished, or never started, is no takeover.
    assert_eq!(p.strict(2).await.unwrap(), 3);
    assert_eq!(p.strict(2).await.unwrap(), 3, "replayed");
}

/// `on_takeover = fail` after a crash: a lapsed claim (no steps) is refused too.
#[tokio::test(start_paused = true)]
async fn on_takeover_fail_refuses_a_lapsed_claim() {
    let p = Policies::default();
    crashed_holder(&p.store, "takeover-fail", 3).await;
    assert!(matches!(
        p.strict(3).await,
        Err(AppError::Idem(Error::TakenOver))
    ));
    assert!(matches!(
        p.strict(3).await,
        Err(AppError::Idem(Error::TakenOver))
    ));
    assert_eq!(p.runs.load(Ordering::SeqCst), 0);
}

/// `on_takeover = reconcile(f)`: `f` runs first on a takeover only; its error
/// fails the call (the body does not run, the steps stay), its `Ok` lets the
/// body resume.
#[tokio::test]
async fn on_takeover_reconcile_runs_first_and_decides() {
    let p = Policies::default();
    assert_eq!(
        p.reconciled(4).await.unwrap(),
        1,
        "no takeover: no reconciliation"
    );
    assert_eq!(p.reconciled.load(Ordering::SeqCst), 0);
    p.fail_once.store(true, Ordering::SeqCst);
    assert!(matches!(p.reconciled(5).await, Err(AppError::Unavailable)));
    match p.reconciled(5).await {
        Err(AppError::Declined(why)) => assert!(why.contains("not settled"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(p.runs.load(Ordering::SeqCst), 2, "the body did not run");
    p.settled.store(true, Ordering::SeqCst);
    assert_eq!(
        p.reconciled(5).await.unwrap(),
        3,
        "reconciled: the body resumes"
    );
    assert_eq!(p.reconciled.load(Ordering::SeqCst), 2);
}

// The third break-it review (on_takeover).

#[derive(Default)]
struct Reviewed {
    store: MemoryStore,
    runs: AtomicUsize,
    fail_once: std::sync::atomic::AtomicBool,
    settled: std::sync::atomic::AtomicBool,
}

impl Reviewed {
    #[idempotent(key = order, name = "r3-fail", ttl = "60s", on_takeover = fail, store = self.store)]
    async fn strict(&self, order: u64) -> Result<usize, AppError> {
        self.body(order).await
    }

    #[idempotent(
        key = order,
        name = "r3-reconcile-cache",
        ttl = "60s",
        cache_errors = AppError::is_final,
        on_takeover = reconcile(|_a: &idem_runtime::Attempt| self.reconcile()),
        store = self.store
    )]
    async fn reconciled_cached(&self, order: u64) -> Result<usize, AppError> {
        self.body(order).await
    }

    async fn body(&self, order: u64) -> Result<usize, AppError> {
        let n = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        step("charge", async { Ok::<_, AppError>(order) }).await?;
        if self.fail_once.swap(false, Ordering::SeqCst) {
            return Err(AppError::Unavailable);
        }
        Ok(n)
    }

    async fn reconcile(&self) -> Result<(), AppError> {
        if self.settled.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(AppError::Declined("not settled".into()))
        }
    }
}

/// Found by the third break-it review: each refusal recorded the mark again,
/// pushing its keep-until forward, so a client retrying every 30 s (ttl 60 s)
/// was refused forever. The mark is recorded once.
#[tokio::test(start_paused = true)]
async fn a_refused_takeover_clears_after_the_ttl_however_often_it_is_retried() {
    let r = Reviewed::default();
    r.fail_once.store(true, Ordering::SeqCst);
    assert!(matches!(r.strict(1).await, Err(AppError::Unavailable)));
    for i in 0..8 {
        tokio::time::advance(Duration::from_secs(30)).await;
        let got = r.strict(1).await;
        if i == 0 {
            assert!(
                matches!(got, Err(AppError::Idem(Error::TakenOver))),
                "{got:?}"
            );
        }
    }
    // 240 s after the last recorded real step, 4x the ttl.
    assert!(
        !matches!(r.strict(1).await, Err(AppError::Idem(Error::TakenOver))),
        "still refused 4x ttl after the unfinished attempt"
    );
}

/// Found by the third break-it review: with `cache_errors` and a recorded
/// step, a reconcile refusal went through the codec (and came back as a step
/// mismatch); it is the caller's error, never recorded.
#[tokio::test]
async fn a_reconcile_refusal_reaches_the_caller_even_with_cache_errors() {
    let r = Reviewed::default();
    r.fail_once.store(true, Ordering::SeqCst);
    assert!(matches!(
        r.reconciled_cached(7).await,
        Err(AppError::Unavailable)
    ));
    let got = r.reconciled_cached(7).await;
    assert!(matches!(got, Err(AppError::Declined(_))), "{got:?}");
    r.settled.store(true, Ordering::SeqCst);
    assert_eq!(r.reconciled_cached(7).await.unwrap(), 2, "the body resumes");
}

/// Found by the third break-it review: with `cache_errors` and a lapsed claim,
/// a reconcile refusal was stored as the call's outcome, replayed for the
/// whole ttl even once reconciled.
#[tokio::test(start_paused = true)]
async fn a_reconcile_refusal_is_never_the_calls_outcome() {
    let r = Reviewed::default();
    crashed_holder(&r.store, "r3-reconcile-cache", 9).await;
    let first = r.reconciled_cached(9).await;
    assert!(matches!(first, Err(AppError::Declined(_))), "{first:?}");
    r.settled.store(true, Ordering::SeqCst);
    // The refusal left its mark: the next attempt reconciles again, and now
    // the earlier charge is settled.
    tokio::time::advance(Duration::from_secs(31)).await;
    let second = r.reconciled_cached(9).await;
    assert!(second.is_ok(), "reconciled: the body runs, got {second:?}");
}

struct ReviewedFaulty {
    store: FaultyStore,
    runs: AtomicUsize,
}

impl ReviewedFaulty {
    #[idempotent(key = order, name = "r3-fail-faulty", ttl = "60s", on_takeover = fail, store = self.store)]
    async fn strict(&self, order: u64) -> Result<u64, AppError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        Ok(order)
    }
}

/// Found by the third break-it review: a refusal whose mark could not be
/// written (a store blip) released the claim anyway, and the next retry ran
/// the body. Now the claim lapses instead, and the next attempt is refused.
#[tokio::test(start_paused = true)]
async fn a_refused_takeover_whose_mark_fails_stays_refused() {
    let f = ReviewedFaulty {
        store: FaultyStore::default(),
        runs: AtomicUsize::new(0),
    };
    crashed_holder(&f.store, "r3-fail-faulty", 3).await;
    f.store.steps_fail.store(true, Ordering::SeqCst);
    assert!(matches!(
        f.strict(3).await,
        Err(AppError::Idem(Error::TakenOver))
    ));
    f.store.steps_fail.store(false, Ordering::SeqCst);
    tokio::time::advance(Duration::from_secs(31)).await;
    let next = f.strict(3).await;
    assert!(
        matches!(next, Err(AppError::Idem(Error::TakenOver))),
        "{next:?}"
    );
    assert_eq!(f.runs.load(Ordering::SeqCst), 0, "the body never ran");
}

// The fourth break-it review.

#[derive(Default)]
struct Unreconciled {
    store: MemoryStore,
    runs: AtomicUsize,
    reconciled: AtomicUsize,
}

impl Unreconciled {
    #[idempotent(
        key = order,
        name = "reconcile-refuses",
        ttl = "60s",
        on_takeover = reconcile(|_a: &idem_runtime::Attempt| self.refuse()),
        store = self.store
    )]
    async fn call(&self, order: u64) -> Result<usize, AppError> {
        Ok(self.runs.fetch_add(1, Ordering::SeqCst) + 1)
    }

    async fn refuse(&self) -> Result<(), AppError> {
        self.reconciled.fetch_add(1, Ordering::SeqCst);
        Err(AppError::Declined(
            "cannot tell whether the earlier attempt charged".into(),
        ))
    }
}

/// Found by the fourth break-it review: a reconcile refusal on a lapsed claim
/// (an attempt that crashed before any step) released it, and the next retry
/// ran the body unreconciled. A refusal leaves the mark, as `fail` does.
#[tokio::test(start_paused = true)]
async fn a_reconcile_refusal_is_met_again_by_the_next_retry() {
    let r = Unreconciled::default();
    crashed_holder(&r.store, "reconcile-refuses", 1).await;
    for _ in 0..3 {
        let refused = r.call(1).await;
        assert!(matches!(refused, Err(AppError::Declined(_))), "{refused:?}");
    }
    assert_eq!(
        r.reconciled.load(Ordering::SeqCst),
        3,
        "each retry reconciles"
    );
    assert_eq!(r.runs.load(Ordering::SeqCst), 0, "the body never ran");
}

/// A holder of `name`'s key for `order` that crashed: its claim (a 1 s lease)
/// is left to lapse.
async fn crashed_holder(store: &dyn Store, name: &str, order: u64) {
    let key = Key::derive(name, &order).unwrap();
    store
        .claim(ClaimRequest {
            key: key.as_str(),
            fingerprint: None,
            lease: Duration::from_secs(1),
        })
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(2)).await;
}
