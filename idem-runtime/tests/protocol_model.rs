//! The claim protocol, model-checked (issue 14): every interleaving of a few
//! clients and one store, explored exhaustively with [stateright], up to a
//! bounded clock.
//!
//! The model is small on purpose: one key, two or three clients, a store that
//! follows the claim table of docs/CONTRACT.md §3.2, and an abstract clock that
//! moves in whole ticks. Within those bounds the checker visits every reachable
//! state and checks each property in each of them; the tests assert that it
//! found no counterexample, and that it does find one in deliberately broken
//! variants of the store (the mutations), so the properties have teeth.
//!
//! # What each action mirrors
//!
//! | action | what it stands for in the code |
//! |---|---|
//! | `Claim` | `Store::claim` (store/mod.rs; the table of CONTRACT §3.2), sent by `engine::claim` (engine/claim.rs); `InProgress` leaves the caller to retry later (`in_progress = reject`) |
//! | `ClaimReplyLost` | a claim that lands in the store but whose reply never arrives: the call fails with `Error::Store`, nothing runs, the caller tries again later; a claim it won lapses with its lease (tests/stores/lost_replies.rs) |
//! | `Run` | the body: the external effect (a card charged), counted in `effects` |
//! | `Renew` | the lease watchdog, `engine/lease.rs` `Watchdog`: `Store::renew` with the claim's token |
//! | `Complete` | `engine/lease.rs` `complete` / `attempt`: `Store::complete`; on `LeaseLost` it reads the record with `Store::get` and counts a record completed with its own token as done (an earlier reply was lost) |
//! | `CompleteReplyLost` | a completion that lands but whose reply is lost; the holder then retries it (the `attempt` loop) |
//! | `Release` | `engine/held.rs` `Held::release` after an error, or `Held`'s `Drop` (`release_now`) when the call is cancelled; the caller may then retry |
//! | `Crash` | the process dies: it forgets its claim, releases nothing; the record stays until its lease lapses; the caller (restarted) may retry |
//! | `Pause` / `Resume` | the whole process stops (a GC pause, SIGSTOP, a partition from the store): neither the body nor the watchdog reaches the store, so the lease can lapse while the client still believes it holds the claim |
//! | `Tick` | the store's clock (Redis `TIME`, SQL `now()`, Tokio's clock in `MemoryStore`); leases and ttls are judged by it alone |
//! | `Purge` | `Store::purge_expired` and `MemoryStore`'s sweep: deletes records that no longer decide claims |
//!
//! The watchdog renews every third of the lease, so a running, reachable
//! holder never lets its lease lapse: the model encodes that as a guard on
//! `Tick` (time does not move past the lease of an active holder that has not
//! renewed). Only a paused, crashed or unreachable holder loses its lease.
//!
//! The store is MemoryStore's reading of the table, which every store shares:
//! `complete`, `release` and `renew` need the current token and a processing
//! record, not a live lease (a holder whose lease lapsed but was not taken
//! over may still complete); tokens come from one counter that never goes back.
//!
//! # Properties
//!
//! Checked in every reachable state (`always`), each with a mutation of the
//! store that breaks it, to show the check is not vacuous:
//!
//! | property | what it says | broken by |
//! |---|---|---|
//! | [`ONE_COMPLETION`] | completions with two different tokens never both land on one claim, and a completed record holds the outcome of its own token's run | `Unfenced` |
//! | [`KEPT_UNTIL_TTL`] | the first completed record stays, unchanged, until its ttl runs out: nothing overwrites, releases or purges it | `Unfenced` |
//! | [`LIVE_CLAIM_KEPT`] | while a claim's lease is live, nobody else acquires the key: only its holder's release or completion (or the lease lapsing) frees it | `ReleaseUnfenced` |
//! | [`TOKENS_INCREASE`] | every claim's token is above every token handed out before, also after a release, a purge or an expiry | `TokensPerRecord` |
//! | [`FREE_KEY_CLAIMABLE`] | wherever the key is released, lapsed or expired (by the contract's reading, not the store's), a claim acquires it | `NoTakeover` |
//! | [`ABANDONED_CLAIM_LAPSES`] | a claim no running client renews (crashed, paused, or whose claim reply was lost) can be claimed by someone else once its lease runs out: the clock alone gets there | `NoTakeover` |
//!
//! Liveness ("a released or lapsed claim can be taken again") is the last
//! two: state properties that say, in every reachable state, that a claim
//! acquires now, or after the lease by ticks alone. stateright's `eventually`
//! is not used: it is sound only on acyclic paths, and this model has cycles
//! (renewals, pauses, duplicates told `InProgress`). The `sometimes`
//! properties are witnesses that the model reaches the interesting states at
//! all (so the `always` ones are not true for want of trying):
//! [`TAKEN_OVER`], [`CLAIMED_AFTER_RELEASE`], [`REPLAYED`],
//! [`LOST_REPLY_RECOGNISED`], and [`RAN_TWICE`] — fencing keeps one outcome,
//! not one run: a holder paused past its lease has run its body too, which is
//! why `current().derive_key(..)` exists for downstream calls.
//!
//! # What the model does not cover
//!
//! - The SQL and Redis implementations themselves: the model's store is the
//!   contract's table, and each real store is held to it by the conformance
//!   suite (`idem_runtime::testing::conformance`), not by this model.
//! - Fingerprints (`KeyReused`), `in_progress = wait`, the replay cache, the
//!   codec: none changes who may complete a record.
//! - The `tx =` path (claim and completion in the caller's transaction,
//!   PostgreSQL row locks instead of leases).
//! - Network faults other than "a request lands, its reply is lost": no
//!   duplicated or reordered requests, no partition that lets a client reach
//!   the store for some requests and not others beyond what `Pause` covers.
//! - Clocks: there is one clock, the store's. Skew between store replicas,
//!   Redis asynchronous replication (a failover that loses an acknowledged
//!   claim or completion) and a client's timer running slower than the store's
//!   (a watchdog that renews late without being paused) are outside the model.
//! - More keys, longer runs and more clients than the bounds below: the check
//!   is exhaustive only within them.
//!
//! # Bounds
//!
//! One key; two clients that send at most [`ATTEMPTS`] claims each (a first
//! call and a retry), and a second check with a third client that sends one;
//! the clock stops at `IDEM_MODEL_DEPTH` ticks (default [`DEFAULT_DEPTH`]; two
//! fewer with three clients); the lease is [`LEASE`] ticks and the ttl
//! [`TTL`]. The defaults take about 15 s in a debug build; a larger
//! `IDEM_MODEL_DEPTH` is for release builds. Run with `--nocapture` to see how
//! many states each check explored and the counterexamples:
//!
//! ```text
//! cargo test -p idem-runtime --test protocol_model -- --nocapture
//! IDEM_MODEL_DEPTH=10 cargo test -p idem-runtime --release --test protocol_model -- --nocapture
//! ```
//!
//! [stateright]: https://docs.rs/stateright

use std::time::Instant;

use stateright::{Checker, HasDiscoveries, Model, Path, Property};

/// The default clock bound, in ticks: long enough for a claim to lapse, be
/// taken over, complete and expire, small enough for a debug-mode test run.
const DEFAULT_DEPTH: Tick = 7;
/// How long a claim holds without renewal, in ticks.
const LEASE: Tick = 2;
/// How long a completed outcome is replayed, in ticks.
const TTL: Tick = 3;
/// How many claims each client may send (first call and retries).
const ATTEMPTS: u8 = 2;

/// A time on the store's clock, in ticks.
type Tick = u8;
/// A fencing token.
type Token = u8;

/// A deliberate bug in the store, to show that the checker catches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mutation {
    /// The store as the contract says.
    None,
    /// `complete` ignores the token and the state: it writes the outcome over
    /// whatever record is there (an `UPDATE … WHERE key = $1` without `AND
    /// token = $2 AND state = 'processing'`).
    Unfenced,
    /// The token counter lives in the record, so it starts again at 1 once
    /// the record is released or purged.
    TokensPerRecord,
    /// A lapsed lease is never judged: a processing record answers
    /// `InProgress` until someone releases it.
    NoTakeover,
    /// `release` ignores the token: it deletes whatever processing record is
    /// there (a `DELETE … WHERE key = $1 AND state = 'processing'` without
    /// `AND token = $2`), so a stale holder frees the key under a live claim.
    ReleaseUnfenced,
}

/// The protocol: the store, the clients, and the bounds.
#[derive(Clone, Debug)]
struct Protocol {
    /// How many claims each client may send (its first call and its retries).
    clients: Vec<u8>,
    depth: Tick,
    mutation: Mutation,
}

/// The one record the store keeps for the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Record {
    token: Token,
    state: RecordState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum RecordState {
    Processing {
        lease_until: Tick,
    },
    /// `outcome` names the run that produced it: the token of its claim.
    Completed {
        outcome: Token,
        expires_at: Tick,
    },
}

/// The store: one record, its clock, and its token counter.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Store {
    now: Tick,
    record: Option<Record>,
    next_token: Token,
}

/// What `Store::claim` answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reply {
    Acquired { token: Token },
    InProgress,
    Completed,
}

impl Store {
    /// Whether the record still decides claims (CONTRACT §3.2): a live lease,
    /// or an outcome within its ttl.
    fn live(&self, mutation: Mutation) -> Option<&Record> {
        self.record.as_ref().filter(|r| match r.state {
            RecordState::Processing { .. } if mutation == Mutation::NoTakeover => true,
            RecordState::Processing { lease_until } => lease_until > self.now,
            RecordState::Completed { expires_at, .. } => expires_at > self.now,
        })
    }

    /// The claim table of CONTRACT §3.2, in one atomic step.
    fn claim(&mut self, mutation: Mutation) -> Reply {
        if let Some(record) = self.live(mutation) {
            return match record.state {
                RecordState::Processing { .. } => Reply::InProgress,
                RecordState::Completed { .. } => Reply::Completed,
            };
        }
        let token = match mutation {
            Mutation::TokensPerRecord => self.record.map_or(1, |r| r.token + 1),
            _ => self.next_token,
        };
        self.next_token += 1;
        self.record = Some(Record {
            token,
            state: RecordState::Processing {
                lease_until: self.now + LEASE,
            },
        });
        Reply::Acquired { token }
    }

    /// The record, if `token` is current and the record is processing.
    fn held(&mut self, token: Token) -> Option<&mut Record> {
        self.record
            .as_mut()
            .filter(|r| r.token == token && matches!(r.state, RecordState::Processing { .. }))
    }

    /// `Store::complete`: whether the outcome landed.
    fn complete(&mut self, token: Token, mutation: Mutation) -> bool {
        let now = self.now;
        let record = match mutation {
            Mutation::Unfenced => self.record.as_mut(),
            _ => self.held(token),
        };
        let Some(record) = record else {
            return false;
        };
        record.state = RecordState::Completed {
            outcome: token,
            expires_at: now + TTL,
        };
        true
    }

    /// `Store::release`: deletes the record if `token` holds it.
    fn release(&mut self, token: Token, mutation: Mutation) -> bool {
        let held = match mutation {
            Mutation::ReleaseUnfenced => matches!(
                self.record,
                Some(Record {
                    state: RecordState::Processing { .. },
                    ..
                })
            ),
            _ => self.held(token).is_some(),
        };
        if held {
            self.record = None;
        }
        held
    }

    /// `Store::renew`: extends the lease if `token` holds the record.
    fn renew(&mut self, token: Token) {
        let now = self.now;
        if let Some(record) = self.held(token) {
            record.state = RecordState::Processing {
                lease_until: now + LEASE,
            };
        }
    }

    /// `Store::get` after a refused completion: whether the record is
    /// completed with this very token (the engine's lost-reply check).
    fn completed_by(&self, token: Token) -> bool {
        matches!(
            self.live(Mutation::None),
            Some(Record { token: t, state: RecordState::Completed { .. } }) if *t == token
        )
    }

    /// `Store::purge_expired`: deletes a record that no longer decides claims.
    fn purge(&mut self, mutation: Mutation) -> bool {
        let stale = self.record.is_some() && self.live(mutation).is_none();
        if stale {
            self.record = None;
        }
        stale
    }
}

/// What a client knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Client {
    /// Wants the key's outcome; may send `attempts` more claims.
    Idle { attempts: u8 },
    /// Believes it holds the claim with `token`.
    Holding {
        token: Token,
        attempts: u8,
        body: Body,
        paused: bool,
    },
    /// Has its answer, or has given up.
    Done(Answer),
}

/// How far a holder's body has got.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Body {
    NotRun,
    Ran,
    /// A completion was sent and its reply lost: the holder sends it again.
    CompletionSent,
}

/// How a client's call ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Answer {
    /// Its own outcome was recorded.
    Recorded,
    /// Its completion landed but the reply was lost; the retry was refused and
    /// `Store::get` showed the record completed with its own token.
    RecordedOnRetry,
    /// It replayed a recorded outcome.
    Replayed,
    /// `Error::LeaseLost`: another caller took the key over, or (after a lost
    /// reply) the record this caller completed has expired meanwhile.
    LeaseLost,
    /// It ran out of attempts.
    GaveUp,
}

/// What the checker remembers beside the state, to judge the properties.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Ghost {
    /// The newest token handed out.
    last_token: Token,
    /// Whether a claim got a token not above every earlier one.
    token_reused: bool,
    /// The token whose completion landed on the current claim, if one did.
    landed: Option<Token>,
    /// Whether completions with two different tokens landed on one claim.
    two_landed: bool,
    /// The first completed record, while its ttl lasts: what the store must keep.
    settled: Option<Record>,
    /// The token of the last successful release.
    released: Option<Token>,
    /// How many times a body ran (the external effect).
    effects: u8,
    /// The claim the store last granted or renewed, and its lease's end, until
    /// that claim's own release or completion ends it.
    lease: Option<(Token, Tick)>,
    /// Whether a claim acquired the key while another claim's lease was live.
    stolen: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct State {
    store: Store,
    clients: Vec<Client>,
    ghost: Ghost,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Tick,
    Purge,
    Claim(usize),
    ClaimReplyLost(usize),
    Run(usize),
    Renew(usize),
    Complete(usize),
    CompleteReplyLost(usize),
    Release(usize),
    Crash(usize),
    Pause(usize),
    Resume(usize),
}

impl Client {
    /// The claim this client acts on, if it holds one and is not paused.
    fn active(&self) -> Option<(Token, Body)> {
        match *self {
            Client::Holding {
                token,
                body,
                paused: false,
                ..
            } => Some((token, body)),
            _ => None,
        }
    }

    /// What the client does once its call failed and it may retry.
    fn retry(attempts: u8) -> Client {
        if attempts > 0 {
            Client::Idle { attempts }
        } else {
            Client::Done(Answer::GaveUp)
        }
    }
}

impl State {
    /// Whether the key is free by the contract (CONTRACT §3.2), whatever the
    /// store under test makes of it: no record, a lapsed lease, or an expired
    /// outcome.
    fn key_is_free(&self) -> bool {
        let now = self.store.now;
        self.store.record.is_none_or(|record| match record.state {
            RecordState::Processing { lease_until } => lease_until <= now,
            RecordState::Completed { expires_at, .. } => expires_at <= now,
        })
    }

    /// Whether some running holder's watchdog still has to renew before the
    /// next tick (it renews well within the lease, so time waits for it).
    fn renewal_due(&self) -> bool {
        let Some(Record {
            token,
            state: RecordState::Processing { lease_until },
        }) = self.store.record
        else {
            return false;
        };
        lease_until <= self.store.now + 1
            && self
                .clients
                .iter()
                .any(|c| c.active().is_some_and(|(t, _)| t == token))
    }
}

impl Protocol {
    fn new(clients: &[u8], depth: Tick, mutation: Mutation) -> Self {
        let clients = clients.to_vec();
        Protocol {
            clients,
            depth,
            mutation,
        }
    }

    /// A claim by client `i`; `reply_lost` when the client never hears the answer.
    fn claim(&self, state: &mut State, i: usize, reply_lost: bool) {
        let Client::Idle { attempts } = state.clients[i] else {
            return;
        };
        let attempts = attempts - 1;
        let reply = state.store.claim(self.mutation);
        if let Reply::Acquired { token } = reply {
            let ghost = &mut state.ghost;
            ghost.token_reused |= token <= ghost.last_token;
            let now = state.store.now;
            ghost.stolen |= ghost.lease.is_some_and(|(_, until)| until > now);
            ghost.lease = Some((token, now + LEASE));
            ghost.last_token = ghost.last_token.max(token);
            ghost.landed = None;
        }
        state.clients[i] = match (reply, reply_lost) {
            (_, true) => Client::retry(attempts),
            (Reply::Acquired { token }, false) => Client::Holding {
                token,
                attempts,
                body: Body::NotRun,
                paused: false,
            },
            // `in_progress = reject`: the caller tries again later, the same request.
            (Reply::InProgress, false) => Client::Idle {
                attempts: attempts + 1,
            },
            (Reply::Completed, false) => Client::Done(Answer::Replayed),
        };
    }

    /// A completion by client `i`; `reply_lost` when it lands unheard.
    fn complete(&self, state: &mut State, i: usize, token: Token, reply_lost: bool) {
        let landed = state.store.complete(token, self.mutation);
        if landed {
            let ghost = &mut state.ghost;
            ghost.two_landed |= ghost.landed.is_some_and(|t| t != token);
            ghost.landed = Some(token);
            if ghost.lease.is_some_and(|(t, _)| t == token) {
                ghost.lease = None;
            }
            if ghost.settled.is_none() {
                ghost.settled = state.store.record;
            }
        }
        let Client::Holding {
            attempts, paused, ..
        } = state.clients[i]
        else {
            return;
        };
        state.clients[i] = if reply_lost {
            Client::Holding {
                token,
                attempts,
                body: Body::CompletionSent,
                paused,
            }
        } else if landed {
            Client::Done(Answer::Recorded)
        } else if state.store.completed_by(token) {
            Client::Done(Answer::RecordedOnRetry)
        } else {
            Client::Done(Answer::LeaseLost)
        };
    }

    /// Whether a processing record that no running client renews (its holder
    /// crashed, paused, or never heard that it won) frees the key once its
    /// lease runs out: the clock alone gets there, and a claim then acquires.
    /// Judged where the clock bound leaves room for the lease to run out.
    fn abandoned_claim_lapses(&self, state: &State) -> bool {
        let Some(Record {
            token,
            state: RecordState::Processing { lease_until },
        }) = state.store.record
        else {
            return true;
        };
        let renewed = state
            .clients
            .iter()
            .any(|c| c.active().is_some_and(|(t, _)| t == token));
        if renewed || lease_until > self.depth {
            return true;
        }
        let mut later = state.clone();
        while later.store.now < lease_until {
            let mut actions = Vec::new();
            self.actions(&later, &mut actions);
            match actions.contains(&Action::Tick) {
                true => later = self.next_state(&later, Action::Tick).expect("a tick"),
                false => return false,
            }
        }
        matches!(later.store.claim(self.mutation), Reply::Acquired { .. })
    }
}

impl Model for Protocol {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        vec![State {
            store: Store {
                now: 0,
                record: None,
                next_token: 1,
            },
            clients: self
                .clients
                .iter()
                .map(|&attempts| Client::Idle { attempts })
                .collect(),
            ghost: Ghost {
                last_token: 0,
                token_reused: false,
                landed: None,
                two_landed: false,
                settled: None,
                released: None,
                effects: 0,
                lease: None,
                stolen: false,
            },
        }]
    }

    fn actions(&self, state: &State, actions: &mut Vec<Action>) {
        if state.store.now < self.depth && !state.renewal_due() {
            actions.push(Action::Tick);
        }
        if state.store.record.is_some() && state.store.live(self.mutation).is_none() {
            actions.push(Action::Purge);
        }
        for (i, client) in state.clients.iter().enumerate() {
            match *client {
                Client::Idle { .. } => {
                    actions.push(Action::Claim(i));
                    actions.push(Action::ClaimReplyLost(i));
                }
                Client::Holding { paused: true, .. } => {
                    actions.push(Action::Resume(i));
                    actions.push(Action::Crash(i));
                }
                Client::Holding { body, .. } => {
                    actions.push(Action::Renew(i));
                    actions.push(Action::Pause(i));
                    match body {
                        Body::NotRun => {
                            actions.push(Action::Run(i));
                            // Cancelled before the body ran.
                            actions.push(Action::Release(i));
                        }
                        Body::Ran => {
                            actions.push(Action::Complete(i));
                            actions.push(Action::CompleteReplyLost(i));
                            // The body failed (an error that is not cached).
                            actions.push(Action::Release(i));
                        }
                        Body::CompletionSent => actions.push(Action::Complete(i)),
                    }
                    actions.push(Action::Crash(i));
                }
                Client::Done(_) => {}
            }
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let mut state = last.clone();
        match action {
            Action::Tick => {
                state.store.now += 1;
                let now = state.store.now;
                if let Some(Record {
                    state: RecordState::Completed { expires_at, .. },
                    ..
                }) = state.ghost.settled
                {
                    if expires_at <= now {
                        state.ghost.settled = None;
                    }
                }
            }
            Action::Purge => {
                state.store.purge(self.mutation);
            }
            Action::Claim(i) => self.claim(&mut state, i, false),
            Action::ClaimReplyLost(i) => self.claim(&mut state, i, true),
            Action::Run(i) => {
                let Client::Holding { body, .. } = &mut state.clients[i] else {
                    return None;
                };
                *body = Body::Ran;
                state.ghost.effects += 1;
            }
            Action::Renew(i) => {
                let (token, _) = state.clients[i].active()?;
                state.store.renew(token);
                if let Some(Record {
                    token: t,
                    state: RecordState::Processing { lease_until },
                }) = state.store.record
                {
                    if t == token {
                        state.ghost.lease = Some((token, lease_until));
                    }
                }
            }
            Action::Complete(i) => {
                let (token, _) = state.clients[i].active()?;
                self.complete(&mut state, i, token, false);
            }
            Action::CompleteReplyLost(i) => {
                let (token, _) = state.clients[i].active()?;
                self.complete(&mut state, i, token, true);
            }
            Action::Release(i) => {
                let Client::Holding {
                    token, attempts, ..
                } = state.clients[i]
                else {
                    return None;
                };
                if state.store.release(token, self.mutation) {
                    state.ghost.released = Some(token);
                    if state.ghost.lease.is_some_and(|(t, _)| t == token) {
                        state.ghost.lease = None;
                    }
                }
                state.clients[i] = Client::retry(attempts);
            }
            Action::Crash(i) => {
                let Client::Holding { attempts, .. } = state.clients[i] else {
                    return None;
                };
                state.clients[i] = Client::retry(attempts);
            }
            Action::Pause(i) | Action::Resume(i) => {
                let Client::Holding { paused, .. } = &mut state.clients[i] else {
                    return None;
                };
                *paused = action == Action::Pause(i);
            }
        }
        Some(state)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always(ONE_COMPLETION, |_, s: &State| {
                !s.ghost.two_landed
                    && match s.store.record {
                        Some(Record {
                            token,
                            state: RecordState::Completed { outcome, .. },
                        }) => outcome == token,
                        _ => true,
                    }
            }),
            Property::always(KEPT_UNTIL_TTL, |_, s: &State| {
                s.ghost
                    .settled
                    .is_none_or(|settled| s.store.record == Some(settled))
            }),
            Property::always(LIVE_CLAIM_KEPT, |_, s: &State| !s.ghost.stolen),
            Property::always(TOKENS_INCREASE, |_, s: &State| !s.ghost.token_reused),
            Property::always(FREE_KEY_CLAIMABLE, |m: &Self, s: &State| {
                !s.key_is_free()
                    || matches!(s.store.clone().claim(m.mutation), Reply::Acquired { .. })
            }),
            Property::always(ABANDONED_CLAIM_LAPSES, |m: &Self, s: &State| {
                m.abandoned_claim_lapses(s)
            }),
            Property::sometimes(TAKEN_OVER, |_, s: &State| {
                let newest = s.store.record.map(|r| r.token);
                // Paused before it sent a completion: only a lapse moves the record on.
                let stale_paused = s.clients.iter().any(|c| {
                    matches!(
                        c,
                        Client::Holding { token, paused: true, body: Body::NotRun | Body::Ran, .. }
                            if Some(*token) != newest
                    )
                });
                stale_paused
                    && s.clients
                        .iter()
                        .any(|c| c.active().is_some_and(|(t, _)| Some(t) == newest))
            }),
            Property::sometimes(CLAIMED_AFTER_RELEASE, |_, s: &State| {
                s.ghost.released.is_some_and(|released| {
                    s.clients
                        .iter()
                        .any(|c| matches!(c, Client::Holding { token, .. } if *token > released))
                })
            }),
            Property::sometimes(RAN_TWICE, |_, s: &State| {
                let ran = |c: &&Client| {
                    matches!(
                        c,
                        Client::Holding {
                            body: Body::Ran | Body::CompletionSent,
                            ..
                        }
                    )
                };
                s.ghost.effects >= 2 && s.clients.iter().filter(ran).count() >= 2
            }),
            Property::sometimes(REPLAYED, |_, s: &State| {
                s.clients.contains(&Client::Done(Answer::Replayed))
            }),
            Property::sometimes(LOST_REPLY_RECOGNISED, |_, s: &State| {
                s.clients.contains(&Client::Done(Answer::RecordedOnRetry))
            }),
        ]
    }
}

// The properties, by name.
const ONE_COMPLETION: &str = "at most one completion lands per claim";
const KEPT_UNTIL_TTL: &str = "a completed record is kept until its ttl";
const LIVE_CLAIM_KEPT: &str = "nobody acquires the key under a live claim";
const TOKENS_INCREASE: &str = "tokens strictly increase";
const FREE_KEY_CLAIMABLE: &str = "a released, lapsed or expired key can be claimed";
const ABANDONED_CLAIM_LAPSES: &str = "a claim nobody renews can be taken once its lease runs out";
const TAKEN_OVER: &str = "a lapsed claim is taken over while its holder is paused";
const CLAIMED_AFTER_RELEASE: &str = "a released key is claimed again";
const RAN_TWICE: &str = "the body runs under two claims at once";
const REPLAYED: &str = "a duplicate replays the outcome";
const LOST_REPLY_RECOGNISED: &str = "a completion whose reply was lost is recognised";

/// The clock bound: `IDEM_MODEL_DEPTH` ticks, or [`DEFAULT_DEPTH`].
fn depth() -> Tick {
    match std::env::var("IDEM_MODEL_DEPTH") {
        Ok(depth) => depth
            .parse()
            .expect("IDEM_MODEL_DEPTH is a number of ticks (0-250)"),
        Err(_) => DEFAULT_DEPTH,
    }
}

/// Explores all of `model` breadth first and prints how much it explored.
fn check(model: Protocol) -> impl Checker<Protocol> {
    let label = format!("{model}");
    let started = Instant::now();
    let checker = model.checker().spawn_bfs().join();
    println!(
        "{label}: {} unique states ({} generated, depth {}) in {:.2?}",
        checker.unique_state_count(),
        checker.state_count(),
        checker.max_depth(),
        started.elapsed()
    );
    checker
}

/// A shortest path to a discovery for `property`, printed as a story.
///
/// The breadth-first checker keeps the last path it found in a block of
/// states, not the first, so the depth is raised one step at a time until a
/// discovery appears: the first one found is then as short as any.
fn shortest_discovery(model: Protocol, property: &'static str) -> Path<State, Action> {
    let label = format!("{model}");
    let started = Instant::now();
    for depth in 2..=usize::from(model.depth) * 8 {
        let checker = model
            .clone()
            .checker()
            .target_max_depth(depth)
            .finish_when(HasDiscoveries::AnyOf([property].into()))
            .spawn_bfs()
            .join();
        if let Some(path) = checker.discovery(property) {
            println!(
                "{label}: {property:?}: a shortest path, {} steps, found in {:.2?} \
                 ({} unique states explored to that depth)\n{}",
                path.clone().into_actions().len(),
                started.elapsed(),
                checker.unique_state_count(),
                narrate(path.clone())
            );
            return path;
        }
        if checker.max_depth() < depth - 1 {
            break; // the whole space fits in this depth
        }
    }
    panic!("{label}: no discovery for {property:?}");
}

/// The state after `actions`, each of which must be enabled when it is taken.
fn play(model: &Protocol, actions: &[Action]) -> State {
    let mut state = model.init_states().remove(0);
    for &action in actions {
        let mut enabled = Vec::new();
        model.actions(&state, &mut enabled);
        assert!(
            enabled.contains(&action),
            "{action:?} is not enabled in {state:?}"
        );
        state = model.next_state(&state, action).expect("an enabled action");
    }
    state
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "clients {:?} (claims each), {} ticks, mutation {:?}",
            self.clients, self.depth, self.mutation
        )
    }
}

/// A discovery as a story: each action, and the store's clock and record after it.
fn narrate(path: Path<State, Action>) -> String {
    let steps = path.into_vec();
    let mut story = String::new();
    for pair in steps.windows(2) {
        let ((_, action), (after, _)) = (&pair[0], &pair[1]);
        let action = action.expect("every step but the last has an action");
        story += &format!(
            "  {action:?} -> t={} {:?}\n",
            after.store.now, after.store.record
        );
    }
    if let Some((last, _)) = steps.last() {
        story += &format!("  clients {:?}\n  {:?}\n", last.clients, last.ghost);
    }
    story
}

#[test]
fn two_clients_keep_every_property() {
    let checker = check(Protocol::new(&[ATTEMPTS; 2], depth(), Mutation::None));
    // No counterexample to an `always`, an example of every `sometimes`, and
    // the whole state space explored.
    checker.assert_properties();
    assert!(checker.is_done());
}

#[test]
fn three_clients_keep_every_property() {
    let model = Protocol::new(
        &[ATTEMPTS, ATTEMPTS, 1],
        depth().saturating_sub(2),
        Mutation::None,
    );
    let checker = check(model);
    checker.assert_properties();
    assert!(checker.is_done());
}

/// Fencing keeps one outcome, not one run: a holder paused past its lease
/// still runs its body after another caller took the key over (which is
/// what `current().derive_key(..)` is for, downstream).
#[test]
fn the_body_can_run_under_two_claims() {
    let model = Protocol::new(&[ATTEMPTS; 2], depth(), Mutation::None);
    let actions = shortest_discovery(model, RAN_TWICE).into_actions();
    assert!(actions.contains(&Action::Pause(0)) || actions.contains(&Action::Pause(1)));
}

/// The mutation the model exists for: completion without fencing lets a
/// paused holder's outcome land on the claim that took it over.
#[test]
fn an_unfenced_completion_is_caught() {
    let model = Protocol::new(&[ATTEMPTS; 2], depth(), Mutation::Unfenced);
    let steps = shortest_discovery(model, ONE_COMPLETION).into_vec();
    // The completion that breaks it comes from a holder whose token is no
    // longer the record's (paused past its lease, or retrying a completion
    // whose reply was lost after the record expired and was claimed again).
    let (before, last) = match &steps[..] {
        [.., (before, Some(last)), _] => (before, *last),
        _ => panic!("an empty counterexample"),
    };
    let (Action::Complete(i) | Action::CompleteReplyLost(i)) = last else {
        panic!("the last step is not a completion: {last:?}");
    };
    let Client::Holding { token, .. } = before.clients[i] else {
        panic!("client {i} completed without holding a claim");
    };
    assert_ne!(before.store.record.map(|r| r.token), Some(token));
    // The classic case, played step by step: a holder paused past its lease
    // resumes after another caller took over and completed.
    let paused_holder = [
        Action::Claim(0),
        Action::Run(0),
        Action::Pause(0),
        Action::Tick,
        Action::Tick,
        Action::Claim(1),
        Action::Run(1),
        Action::Complete(1),
        Action::Resume(0),
        Action::Complete(0),
    ];
    let holds = |mutation| {
        let model = Protocol::new(&[ATTEMPTS; 2], depth(), mutation);
        let property = model.property(ONE_COMPLETION);
        let end = play(&model, &paused_holder);
        (property.condition)(&model, &end)
    };
    assert!(
        holds(Mutation::None),
        "fenced: the paused holder's completion is refused"
    );
    assert!(
        !holds(Mutation::Unfenced),
        "unfenced: it lands on the other claim's record"
    );
    // Unfenced, the outcome kept for the ttl is overwritten too.
    shortest_discovery(
        Protocol::new(&[ATTEMPTS; 2], depth(), Mutation::Unfenced),
        KEPT_UNTIL_TTL,
    );
}

/// An edge the model shows in the engine's lost-reply check: a completion
/// lands, its reply is lost, and the retry comes after the record's ttl ran
/// out and another caller claimed the key. `Store::get` then shows the other
/// claim, so the caller is told `LeaseLost` although its outcome was recorded
/// (and replayed for the whole ttl). The body still ran once, and no outcome
/// was overwritten; only the caller's answer is off. It takes a ttl shorter
/// than the completion's retries (60 ms in place, 5 minutes in the background).
#[test]
fn a_completion_retried_after_its_ttl_reads_as_lease_lost() {
    let model = Protocol::new(&[ATTEMPTS; 2], depth(), Mutation::None);
    let mut actions = vec![
        Action::Claim(0),
        Action::Run(0),
        Action::CompleteReplyLost(0),
    ];
    let landed = play(&model, &actions);
    assert_eq!(
        landed.ghost.landed,
        Some(1),
        "client 0's outcome is recorded"
    );
    actions.extend([Action::Tick; TTL as usize]);
    actions.extend([Action::Claim(1), Action::Complete(0)]);
    let end = play(&model, &actions);
    assert_eq!(end.clients[0], Client::Done(Answer::LeaseLost));
    assert_eq!(end.ghost.effects, 1, "the body ran once");
}

#[test]
fn tokens_restarting_with_the_record_are_caught() {
    let model = Protocol::new(&[ATTEMPTS; 2], depth(), Mutation::TokensPerRecord);
    shortest_discovery(model, TOKENS_INCREASE);
}

#[test]
fn leases_that_never_lapse_are_caught() {
    let model = Protocol::new(&[ATTEMPTS; 2], depth(), Mutation::NoTakeover);
    shortest_discovery(model.clone(), FREE_KEY_CLAIMABLE);
    shortest_discovery(model.clone(), ABANDONED_CLAIM_LAPSES);
    let checker = check(model);
    assert!(checker.is_done());
    assert!(
        checker.discovery(TAKEN_OVER).is_none(),
        "no claim is ever taken over"
    );
}

/// A release that ignores its token lets a stale holder (paused past its
/// lease, taken over, resumed) delete the claim that took over while that
/// claim's lease is live; a third caller then runs beside it. No other
/// property sees it: each completion still lands at most once.
#[test]
fn a_release_without_its_token_is_caught() {
    let model = Protocol::new(&[ATTEMPTS; 2], depth(), Mutation::ReleaseUnfenced);
    let steps = shortest_discovery(model.clone(), LIVE_CLAIM_KEPT).into_vec();
    // Somewhere on the path, a release by a client whose token was not the record's landed.
    let stale_release = steps.windows(2).any(|pair| {
        let ((before, action), (after, _)) = (&pair[0], &pair[1]);
        let Some(Action::Release(i)) = action else {
            return false;
        };
        let Client::Holding { token, .. } = before.clients[*i] else {
            return false;
        };
        before.store.record.is_some_and(|r| r.token != token) && after.store.record.is_none()
    });
    assert!(stale_release, "the counterexample has no stale release");
    let checker = check(model);
    for property in [
        ONE_COMPLETION,
        KEPT_UNTIL_TTL,
        TOKENS_INCREASE,
        FREE_KEY_CLAIMABLE,
    ] {
        assert!(
            checker.discovery(property).is_none(),
            "only {LIVE_CLAIM_KEPT:?} catches it, not {property:?}"
        );
    }
}
