//! Each command: read what it is about, check the record's state, and for a
//! destructive command, say what it would do (without `--yes`) or do it
//! with one fenced write.

use std::io::Write;

use idem_runtime::store::admin::{Admin, Entry, Query, Status};
use idem_runtime::{Error, FencingToken};
use serde_json::{json, Value};

use crate::args::{Cli, Command, TargetArgs};
use crate::report::{self, entry_json, failure, failure_with, success};
use crate::target::{self, Target};
use crate::{duration, Exit};

/// Writers and the parsed command line, as every command needs them.
struct Io<'a> {
    cli: &'a Cli,
    out: &'a mut dyn Write,
    err: &'a mut dyn Write,
}

impl Io<'_> {
    fn fail(&mut self, exit: Exit, message: &str) -> Exit {
        failure(self.cli, self.out, self.err, exit, message)
    }

    fn fail_with(&mut self, exit: Exit, message: &str, detail: Value) -> Exit {
        failure_with(self.cli, self.out, self.err, exit, message, detail)
    }

    fn store_error(&mut self, error: &Error) -> Exit {
        self.fail(Exit::Store, &format!("the store failed: {error}"))
    }

    fn ok(&mut self, human: &str, document: Value) -> Exit {
        success(self.cli, self.out, human, document)
    }
}

/// Runs the parsed command on `store`.
pub(crate) async fn run(
    cli: &Cli,
    store: &dyn Admin,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Exit {
    let mut io = Io { cli, out, err };
    let done = match &cli.command {
        Command::Inspect { target } => inspect(store, &mut io, target).await,
        Command::List {
            stuck,
            namespace,
            limit,
        } => {
            let mut query = Query::new().limit(*limit);
            query.namespace = namespace.clone();
            query.stuck = *stuck;
            list(store, &mut io, &query).await
        }
        Command::Stats => stats(store, &mut io).await,
        Command::Release {
            target,
            forget_steps,
            token,
            yes,
        } => release(store, &mut io, target, *forget_steps, *token, *yes).await,
        Command::Invalidate { target, token, yes } => {
            invalidate(store, &mut io, target, *token, *yes).await
        }
        Command::Purge { batch, yes, .. } => purge(store, &mut io, *batch, *yes).await,
    };
    done.unwrap_or_else(|exit| exit)
}

/// The record `args` names, read from the store.
async fn find(store: &dyn Admin, io: &mut Io<'_>, args: &TargetArgs) -> Result<Entry, Exit> {
    let window = args
        .window
        .as_deref()
        .map(duration::parse)
        .transpose()
        .map_err(|e| io.fail(Exit::Usage, &format!("--window: {e}")))?;
    let spec = target::Spec {
        namespace_or_key: args.namespace_or_key.as_deref(),
        parts: args.parts.as_deref(),
        digest: args.digest.as_deref(),
        window,
        at_ms: args.at,
    };
    let target = target::resolve(&spec).map_err(|e| io.fail(Exit::Usage, &e))?;
    match target {
        Target::Key(key) => match store.inspect(&key).await {
            Ok(Some(entry)) => Ok(entry),
            Ok(None) => {
                // Plain JSON reads a `Some` field, a set or a map with
                // non-string keys as another value: say so with the miss.
                let hint = if spec.parts.is_some() {
                    format!(
                        " (derived from the key parts; a part holding an Option that is Some, a set, \
                         a map with non-string keys, an enum or an f32 needs its typed spelling: {})",
                        target::TAGS
                    )
                } else {
                    String::new()
                };
                Err(io.fail_with(
                    Exit::NotFound,
                    &format!("no record under {key}{hint}"),
                    json!({ "key": key }),
                ))
            }
            Err(e) => Err(io.store_error(&e)),
        },
        Target::Digest(digest) => {
            let found = store
                .list(&Query::new().digest(digest).limit(10))
                .await
                .map_err(|e| io.store_error(&e))?;
            match <[Entry; 1]>::try_from(found) {
                // As `inspect KEY` answers an unreadable record: exit 4.
                Ok([entry]) if entry.status == Status::Corrupt => Err(io.store_error(
                    &Error::codec(entry.problem.unwrap_or_else(|| "corrupt record".into())),
                )),
                Ok([entry]) => Ok(entry),
                Err(found) if found.is_empty() => Err(io.fail(
                    Exit::NotFound,
                    &format!("no record with digest {digest} in any namespace"),
                )),
                Err(found) => {
                    let keys: Vec<&str> = found.iter().map(|e| e.key.as_str()).collect();
                    Err(io.fail_with(
                        Exit::Refused,
                        &format!(
                            "digest {digest} is in several namespaces; name one (NAMESPACE --digest HEX): {}",
                            keys.join(", ")
                        ),
                        json!({ "keys": keys }),
                    ))
                }
            }
        }
    }
}

async fn inspect(store: &dyn Admin, io: &mut Io<'_>, args: &TargetArgs) -> Result<Exit, Exit> {
    let entry = find(store, io, args).await?;
    Ok(io.ok(&report::entry_human(&entry), entry_json(&entry)))
}

async fn list(store: &dyn Admin, io: &mut Io<'_>, query: &Query) -> Result<Exit, Exit> {
    let entries = store.list(query).await.map_err(|e| io.store_error(&e))?;
    let mut human = report::entries_human(&entries);
    let truncated = query.limit > 0 && entries.len() >= query.limit;
    if truncated {
        human.push_str(&format!(
            "(the first {} records; --limit N for more)\n",
            query.limit
        ));
    }
    let document = json!({
        "records": entries.iter().map(entry_json).collect::<Vec<_>>(),
        "count": entries.len(),
        "limit": query.limit,
        "truncated": truncated,
    });
    Ok(io.ok(&human, document))
}

async fn stats(store: &dyn Admin, io: &mut Io<'_>) -> Result<Exit, Exit> {
    let counts = store.stats().await.map_err(|e| io.store_error(&e))?;
    let (human, document) = report::stats(&counts);
    Ok(io.ok(&human, document))
}

/// Refuses unless the record still holds `--token` (when given).
fn check_token(io: &mut Io<'_>, entry: &Entry, token: Option<u64>) -> Result<(), Exit> {
    match token {
        Some(token) if token != entry.token.get() => Err(io.fail_with(
            Exit::Conflict,
            &format!(
                "{} now holds token {}, not {token}: it changed since you looked; nothing was changed",
                entry.key, entry.token
            ),
            json!({ "entry": entry_json(entry) }),
        )),
        _ => Ok(()),
    }
}

/// What kept steps become, for the messages.
fn steps_phrase(entry: &Entry, forget: bool) -> String {
    let what = match (entry.steps, entry.takeover_mark) {
        (0, false) => return String::new(),
        (n, false) => format!("its {n} kept step(s)"),
        (0, true) => "its takeover mark".to_owned(),
        (n, true) => format!("its {n} kept step(s) and takeover mark"),
    };
    if forget {
        format!("; {what} are dropped: the next call starts over")
    } else {
        format!("; {what} stay: the next call resumes them")
    }
}

/// Without `--yes`: what would be done, and exit 6.
fn unconfirmed(io: &mut Io<'_>, entry: &Entry, would: &str) -> Exit {
    io.fail_with(
        Exit::NotConfirmed,
        &format!("would {would}; run again with --yes to do it"),
        json!({ "would": would, "entry": entry_json(entry) }),
    )
}

/// After a fenced write: the outcome, or a conflict when the fence held.
async fn settle(
    store: &dyn Admin,
    io: &mut Io<'_>,
    before: &Entry,
    done: Result<(), Error>,
    action: &str,
    what: &str,
) -> Result<Exit, Exit> {
    match done {
        Ok(()) => {}
        Err(Error::LeaseLost) => {
            let now = store.inspect(&before.key).await.ok().flatten();
            let state = now.as_ref().map_or("it is gone".to_owned(), |e| {
                format!("it is {} with token {}", e.status, e.token)
            });
            return Err(io.fail_with(
                Exit::Conflict,
                &format!(
                    "{} changed after it was read ({} with token {}; now {state}); nothing was changed: inspect it again",
                    before.key, before.status, before.token
                ),
                json!({ "before": entry_json(before), "now": now.as_ref().map(entry_json) }),
            ));
        }
        Err(e) => return Err(io.store_error(&e)),
    }
    let after = store
        .inspect(&before.key)
        .await
        .map_err(|e| io.store_error(&e))?;
    let human = format!("{what}\n");
    let document = json!({
        "done": action,
        "key": before.key,
        "token": before.token.get().to_string(),
        "before": entry_json(before),
        "after": after.as_ref().map(entry_json),
    });
    Ok(io.ok(&human, document))
}

async fn release(
    store: &dyn Admin,
    io: &mut Io<'_>,
    args: &TargetArgs,
    forget: bool,
    token: Option<u64>,
    yes: bool,
) -> Result<Exit, Exit> {
    let entry = find(store, io, args).await?;
    check_token(io, &entry, token)?;
    let (key, t) = (&entry.key, entry.token);
    let would = match entry.status {
        Status::Running => format!(
            "release the running claim on {key} (token {t}, {} of lease left: a holder still running loses its claim, and the next call runs beside it){}",
            duration::human(entry.expires_in),
            steps_phrase(&entry, forget)
        ),
        Status::Lapsed => format!(
            "release the lapsed claim on {key} (token {t}){}",
            steps_phrase(&entry, forget)
        ),
        Status::Released if forget => format!(
            "forget what the released record {key} keeps (token {t}){}",
            steps_phrase(&entry, true)
        ),
        Status::Released => {
            return Err(io.fail_with(
                Exit::Refused,
                &format!(
                    "{key} is already released{}; --forget-steps drops them",
                    steps_phrase(&entry, false)
                ),
                json!({ "entry": entry_json(&entry) }),
            ))
        }
        Status::Completed => {
            return Err(io.fail_with(
                Exit::Refused,
                &format!(
                    "{key} is completed: release ends a processing claim; to forget the result, `idem invalidate`"
                ),
                json!({ "entry": entry_json(&entry) }),
            ))
        }
        _ => {
            return Err(io.fail_with(
                Exit::Refused,
                &format!("{key} has expired: nothing holds the key (purge removes the record)"),
                json!({ "entry": entry_json(&entry) }),
            ))
        }
    };
    if !yes {
        return Err(unconfirmed(io, &entry, &would));
    }
    let (done, action) = if forget {
        (store.forget(key, t).await, "forget")
    } else {
        (store.release(key, t).await, "release")
    };
    let what = if forget {
        format!("released {key} (token {t}) and forgot its steps: the next call starts over")
    } else {
        format!(
            "released {key} (token {t}): the next call runs{}",
            if entry.steps > 0 || entry.takeover_mark {
                " and resumes the kept steps"
            } else {
                ""
            }
        )
    };
    settle(store, io, &entry, done, action, &what).await
}

async fn invalidate(
    store: &dyn Admin,
    io: &mut Io<'_>,
    args: &TargetArgs,
    token: Option<u64>,
    yes: bool,
) -> Result<Exit, Exit> {
    let entry = find(store, io, args).await?;
    check_token(io, &entry, token)?;
    let (key, t): (&str, FencingToken) = (&entry.key, entry.token);
    let refuse = |why: String| (Exit::Refused, why);
    let refused = match entry.status {
        Status::Completed => None,
        Status::Running | Status::Lapsed => Some(refuse(format!(
            "{key} is processing ({}, token {t}): a call holds it, and its result is not recorded yet; invalidate forgets completed results only (to end the claim: `idem release`)",
            entry.status
        ))),
        Status::Released => Some(refuse(format!(
            "{key} is released, not completed: there is no result to forget (its kept steps: `idem release --forget-steps`)"
        ))),
        _ => Some(refuse(format!(
            "{key} has expired: its result is no longer replayed; the next call runs"
        ))),
    };
    if let Some((exit, message)) = refused {
        return Err(io.fail_with(exit, &message, json!({ "entry": entry_json(&entry) })));
    }
    let would = format!(
        "forget the completed result of {key} (token {t}, {} bytes, {} of ttl left): the next call runs again",
        entry.outcome_len.unwrap_or(0),
        duration::human(entry.expires_in)
    );
    if !yes {
        return Err(unconfirmed(io, &entry, &would));
    }
    let done = store.invalidate(key, t).await;
    let what = format!("invalidated {key} (token {t}): the next call runs again");
    settle(store, io, &entry, done, "invalidate", &what).await
}

async fn purge(store: &dyn Admin, io: &mut Io<'_>, batch: u32, yes: bool) -> Result<Exit, Exit> {
    let kind = store.kind();
    if !yes {
        let would = format!(
            "delete every expired record from the {kind} store, {batch} at a time \
             (results past their ttl, claims whose lease lapsed and keep no steps, released \
             records whose steps are no longer kept)"
        );
        return Err(io.fail_with(
            Exit::NotConfirmed,
            &format!("would {would}; run again with --yes to do it"),
            json!({ "would": would }),
        ));
    }
    let (mut purged, mut batches) = (0u64, 0u64);
    loop {
        let n = store
            .purge_expired(batch as usize)
            .await
            .map_err(|e| io.store_error(&e))?;
        batches += 1;
        purged += n;
        if n == 0 {
            break;
        }
    }
    let note = if kind.starts_with("redis") {
        " (Redis expires records itself)"
    } else {
        ""
    };
    let human = format!("purged {purged} expired record(s){note}\n");
    Ok(io.ok(
        &human,
        json!({ "purged": purged, "batches": batches, "store": kind }),
    ))
}
