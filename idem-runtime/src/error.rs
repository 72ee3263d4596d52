//! The one error type every idem operation returns.

use std::time::Duration;

/// A boxed error from a backend or codec, kept as the `source()` of an [`Error`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why an idempotent call did not run its body or could not record its outcome.
///
/// Every variant has a message a person can act on. The enum may grow, so match
/// it with a wildcard arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Another call with the same key is running now; try again after `retry_after`.
    #[error(
        "a call with the same idempotency key is already in progress; retry after {}",
        fmt_duration(*retry_after)
    )]
    InProgress {
        /// A suggested delay before retrying (at most the remaining lease of the running call).
        retry_after: Duration,
    },

    /// The key was used before with a different request (fingerprint mismatch).
    #[error(
        "the idempotency key was already used with a different request; \
         use a new key for a new request"
    )]
    KeyReused,

    /// The key, or one of its parts, was `None` or empty; the body did not run.
    #[error(
        "the idempotency key is missing (a key part was `None` or empty); the call did not run"
    )]
    MissingKey,

    /// A client-supplied key was rejected by [`ClientKey::parse`](crate::ClientKey::parse).
    #[error("invalid idempotency key: {0}")]
    InvalidKey(#[from] InvalidKey),

    /// The claim this call held was lost (its lease lapsed and another call took it
    /// over, or the record expired); the outcome was not recorded.
    #[error(
        "the claim on this idempotency key was lost (its lease lapsed and another call \
         took it over, or the record expired); the outcome was not recorded"
    )]
    LeaseLost,

    /// A call made from inside an idempotent body with the key that body (or one it
    /// runs inside of) holds: it would wait for itself, so it fails at once.
    #[error(
        "re-entrant idempotent call: this key is held by the call whose body made it \
         (it would wait for itself); use a different key or name for the inner call"
    )]
    Reentrant,

    /// The function's default namespace cannot tell its instantiations apart
    /// (a closure or another anonymous type is among its generic arguments), so
    /// two of them could share records; give the function a `name`.
    #[error(
        "the default namespace `{namespace}` cannot tell this instantiation of the \
         function from others (a closure or other anonymous type is a generic \
         argument); give the function an explicit `name = \"...\"` (instantiations \
         then share records); the call did not run"
    )]
    AmbiguousNamespace {
        /// The default namespace as computed.
        namespace: String,
    },

    /// The store could not be reached or failed; the body did not run (fail-closed).
    #[error("the idempotency store failed: {0}")]
    Store(#[source] BoxError),

    /// A [`RedisStore`](crate::RedisStore) told to wait for replicas
    /// ([`with_replica_ack`](crate::RedisStore::with_replica_ack)) holds this
    /// key's outcome on its master, but fewer replicas than required
    /// acknowledged it in time: a failover now could lose it, so it is not
    /// answered yet. The work is not run again; a retry with the same key gets
    /// the outcome once the replicas have it.
    #[error(
        "the outcome is recorded, but only {acknowledged} of the {required} replicas required \
         acknowledged it in time; it is not answered until they do: retry with the same key later"
    )]
    NotReplicated {
        /// How many replicas acknowledged it within the timeout.
        acknowledged: u32,
        /// How many the store requires.
        required: u32,
    },

    /// A stored outcome (or an outcome to be stored) could not be encoded or decoded.
    #[error("the stored outcome could not be encoded or decoded: {0}")]
    Codec(#[source] BoxError),

    /// This attempt's [steps](crate::step) differ from the ones an earlier
    /// attempt of the same call recorded: the body is not deterministic (it
    /// called another step at this position, or returned before reaching a
    /// recorded one). Nothing is replayed or recorded; the call is released
    /// with its steps kept, for a fixed body or a person to reconcile.
    #[error(
        "step {at} of this call was recorded as {recorded} by an earlier attempt, but this \
         attempt {called}: a resumed body must call the same steps in the same order"
    )]
    StepMismatch {
        /// The step's position in the call (0 for the first).
        at: u32,
        /// The id the earlier attempt recorded there.
        recorded: String,
        /// What this attempt did there (`called "charge"`, `returned first`).
        called: String,
    },

    /// The call continues an earlier attempt that did not finish, and its
    /// policy is [`OnTakeover::Fail`](crate::OnTakeover::Fail): what that
    /// attempt did outside recorded steps is unknown, so the body did not run.
    #[error(
        "an earlier attempt of this call did not finish (it crashed, stalled or was cancelled), \
         and this call fails rather than run again (on_takeover = fail): reconcile what that \
         attempt did, then remove the key's record; the body did not run"
    )]
    TakenOver,

    /// A [`step`](crate::step) used where it cannot be recorded: outside an
    /// idempotent call, inside another step, an id already used in this
    /// call, or a call whose store does not keep steps. The step did not run.
    #[error("the step did not run: {0}")]
    StepMisuse(String),
}

impl Error {
    /// Wraps a backend failure as [`Error::Store`].
    pub fn store(err: impl Into<BoxError>) -> Self {
        Error::Store(err.into())
    }

    /// Wraps an encoding failure as [`Error::Codec`].
    pub fn codec(err: impl Into<BoxError>) -> Self {
        Error::Codec(err.into())
    }

    /// Whether a retry of the same call may succeed later (in progress, a store
    /// failure, an outcome not yet replicated).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::InProgress { .. } | Error::Store(_) | Error::NotReplicated { .. }
        )
    }
}

/// Why a client-supplied idempotency key was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidKey {
    /// The key was empty.
    #[error("the key is empty; it must be 1 to 255 visible ASCII characters")]
    Empty,
    /// The key was longer than 255 bytes.
    #[error("the key is {len} characters long; at most 255 are allowed")]
    TooLong {
        /// The length that was supplied.
        len: usize,
    },
    /// The key held a character outside visible ASCII (`!`..=`~`).
    #[error(
        "the key has a character that is not visible ASCII at position {position}; \
         only `!` to `~` are allowed (no spaces or control characters)"
    )]
    InvalidCharacter {
        /// Zero-based byte position of the first offending character.
        position: usize,
    },
    /// A header value that starts with `"` is not a well-formed Structured
    /// Field string (RFC 8941).
    #[error("the quoted key is malformed: {reason}")]
    MalformedString {
        /// What is wrong with it.
        reason: &'static str,
    },
}

fn fmt_duration(d: Duration) -> String {
    if d.as_millis() < 1000 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}
