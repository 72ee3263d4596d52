//! How outcomes are encoded in a record: JSON, so `psql` or `redis-cli` can read them.
//!
//! A stored outcome is `{"ok": <T>}` or, when errors are cached, `{"err": <E>}`.
//! Anything else in the record (corrupt bytes, another type's shape) decodes to
//! [`Error::Codec`]: never a panic, never a rerun.
//!
//! # Replays are exact
//!
//! Floats are written as the shortest decimal that reads back as the same bits
//! and read back exactly (`serde_json`'s `float_roundtrip`), so a replayed
//! `f64` or `f32` is bit for bit the first result, `-0.0` and subnormals
//! included. An `f32` is written as its exact value widened to `f64` (so
//! `0.1f32` is stored as `0.10000000149011612`): serde reads untagged and
//! internally tagged enums and flattened fields through an `f64` buffer, and
//! the widened decimal is the one that narrows back to the same bits there too. A value JSON cannot give back as it was — a NaN or infinite float,
//! or `Some(x)` where `x` is written as `null` (`Some(None)`, `Some(())`) — is
//! refused before anything is stored: the call returns [`Error::Codec`] and the
//! claim is released, rather than recording a value that would replay as
//! something else for its whole ttl. The codec also reads every outcome back
//! before it is stored, so an outcome whose type cannot deserialize what it
//! serialized (a hand-written impl, `skip_serializing` without a default) is
//! refused the same way instead of becoming a record that never replays.
//!
//! One ambiguity remains that no codec can see without comparing values: a
//! type whose serde form is itself ambiguous (an `#[serde(untagged)]` enum whose
//! variants overlap) replays as whatever serde reads back first.

mod faithful;

use serde::de::{DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Serialize};

use crate::error::Error;

#[derive(Serialize)]
#[serde(rename_all = "lowercase")]
enum StoredRef<'a, T, E> {
    Ok(&'a T),
    Err(&'a E),
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum Stored<T, E> {
    Ok(T),
    Err(E),
}

/// Encodes a successful outcome as `{"ok": value}`.
///
/// A value JSON would not give back as it was (see [the module docs](self))
/// is [`Error::Codec`].
pub fn encode_ok<T: Serialize>(value: &T) -> Result<Vec<u8>, Error> {
    faithful::check(value)
        .map_err(|e| Error::codec(format!("the result cannot be stored faithfully: {e}")))?;
    to_vec(&StoredRef::<T, ()>::Ok(value))
        .map_err(|e| Error::codec(format!("cannot encode the result: {e}")))
}

/// Encodes a failed outcome as `{"err": error}`.
///
/// An error JSON would not give back as it was is [`Error::Codec`].
pub fn encode_err<E: Serialize>(error: &E) -> Result<Vec<u8>, Error> {
    faithful::check(error)
        .map_err(|e| Error::codec(format!("the error cannot be stored faithfully: {e}")))?;
    to_vec(&StoredRef::<(), E>::Err(error))
        .map_err(|e| Error::codec(format!("cannot encode the error: {e}")))
}

/// Compact JSON, except that an `f32` is written as the shortest decimal of
/// its exact `f64` value. serde reads some shapes (untagged and internally
/// tagged enums, `#[serde(flatten)]`) through a buffer that parses every number
/// as `f64` and then narrows it; the `f32`'s own shortest decimal can then
/// round twice and land one unit off, while the widened value narrows exactly.
struct Exact;

impl serde_json::ser::Formatter for Exact {
    fn write_f32<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        value: f32,
    ) -> std::io::Result<()> {
        self.write_f64(writer, value.into())
    }
}

fn to_vec<T: Serialize + ?Sized>(value: &T) -> serde_json::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(128);
    value.serialize(&mut serde_json::Serializer::with_formatter(&mut out, Exact))?;
    Ok(out)
}

/// Decodes an outcome stored by [`encode_ok`] or [`encode_err`].
pub fn decode<T: DeserializeOwned, E: DeserializeOwned>(
    bytes: &[u8],
) -> Result<Result<T, E>, Error> {
    match serde_json::from_slice::<Stored<T, E>>(bytes) {
        Ok(Stored::Ok(v)) => Ok(Ok(v)),
        Ok(Stored::Err(e)) => Ok(Err(e)),
        Err(e) => Err(corrupt(e)),
    }
}

/// Decodes an outcome where only successes are expected (errors are not cached).
pub fn decode_ok<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    match serde_json::from_slice::<Stored<T, IgnoredAny>>(bytes) {
        Ok(Stored::Ok(v)) => Ok(v),
        Ok(Stored::Err(_)) => Err(Error::codec(
            "the record holds a cached error, but this function does not cache errors \
             (was `cache_errors` removed while records were live?)",
        )),
        Err(e) => Err(corrupt(e)),
    }
}

/// serde_json's messages quote the values they stumble on ("invalid type:
/// string \"4111…\""), which are stored data; the error names only the kind
/// of mismatch and where it is, so it can go into logs and problem bodies.
fn corrupt(e: serde_json::Error) -> Error {
    let kind = match e.classify() {
        serde_json::error::Category::Io => "unreadable",
        serde_json::error::Category::Syntax => "not valid JSON",
        serde_json::error::Category::Data => "not the shape of this type",
        serde_json::error::Category::Eof => "truncated",
    };
    Error::codec(format!(
        "the stored outcome is corrupt or was written by an incompatible type: {kind} \
         (line {}, column {})",
        e.line(),
        e.column()
    ))
}

/// How one function's outcomes are stored: `T` always, `E` only when errors are
/// cached. Built once per function; its constructors carry the trait bounds, so
/// the engine itself needs none and a missing `Serialize` is reported once, at
/// the type in the user's signature.
pub struct Codec<T, E> {
    encode_ok: Encoder<T>,
    /// `Some` when errors are cached: the encoder and which errors to cache.
    cache_errors: Option<(Encoder<E>, Predicate<E>)>,
    decode: Decoder<T, E>,
    from_error: fn(Error) -> E,
}

type Encoder<V> = fn(&V) -> Result<Vec<u8>, Error>;
type Predicate<E> = fn(&E) -> bool;
type Decoder<T, E> = fn(&[u8]) -> Result<Result<T, E>, Error>;

impl<T, E> Clone for Codec<T, E> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T, E> Copy for Codec<T, E> {}

impl<T, E> std::fmt::Debug for Codec<T, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Codec")
            .field("caches_errors", &self.cache_errors.is_some())
            .finish_non_exhaustive()
    }
}

impl<T, E> Codec<T, E>
where
    T: Serialize + DeserializeOwned,
    E: From<Error>,
{
    /// Store successes only; an `Err` releases the claim so a retry runs again.
    pub fn release_errors() -> Self {
        Codec {
            encode_ok: encode_ok::<T>,
            cache_errors: None,
            decode: |bytes| decode_ok::<T>(bytes).map(Ok),
            from_error: E::from,
        }
    }
}

impl<T, E> Codec<T, E>
where
    T: Serialize + DeserializeOwned,
    E: From<Error> + Serialize + DeserializeOwned,
{
    /// Store and replay every outcome, errors included (`cache_errors`).
    pub fn cache_errors() -> Self {
        Self::cache_errors_if(|_| true)
    }

    /// Store successes, and the errors for which `cache` returns true
    /// (`cache_errors = path`).
    pub fn cache_errors_if(cache: fn(&E) -> bool) -> Self {
        Codec {
            encode_ok: encode_ok::<T>,
            cache_errors: Some((encode_err::<E>, cache)),
            decode: decode::<T, E>,
            from_error: E::from,
        }
    }
}

impl<T, E> Codec<T, E> {
    /// The bytes to store for `outcome`, or `None` to release the claim instead.
    ///
    /// The bytes are read back before they are returned: an outcome that would
    /// not decode as its own type is [`Error::Codec`] here, never a record.
    pub fn encode(&self, outcome: &Result<T, E>) -> Option<Result<Vec<u8>, Error>> {
        let bytes = match (outcome, self.cache_errors) {
            (Ok(v), _) => (self.encode_ok)(v),
            (Err(e), Some((encode, cache))) if cache(e) => encode(e),
            (Err(_), _) => return None,
        };
        Some(bytes.and_then(|bytes| match (self.decode)(&bytes) {
            Ok(_) => Ok(bytes),
            Err(e) => Err(Error::codec(format!(
                "the outcome cannot be stored: its type does not read back what it wrote ({e})"
            ))),
        }))
    }

    /// Decodes stored bytes back into the outcome to replay.
    pub fn decode(&self, bytes: &[u8]) -> Result<Result<T, E>, Error> {
        (self.decode)(bytes)
    }

    /// Converts idem's error into the function's error type.
    pub fn error(&self, err: Error) -> E {
        (self.from_error)(err)
    }
}

/// Names the codec for the macro with the bounds stated where the types are
/// written, so an unmet bound points at the user's `T` or `E`.
#[doc(hidden)]
pub fn release_errors<T, E>() -> Codec<T, E>
where
    T: StorableOutput,
    E: IdempotentError,
{
    Codec::release_errors()
}

/// See [`release_errors`].
#[doc(hidden)]
pub fn cache_errors<T, E>(cache: Option<fn(&E) -> bool>) -> Codec<T, E>
where
    T: StorableOutput,
    E: IdempotentError + StorableError,
{
    Codec::cache_errors_if(cache.unwrap_or(|_| true))
}

/// The success type of an `#[idempotent]` function is stored as JSON and replayed.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be stored: the success type of an #[idempotent] function must implement `Serialize` and `DeserializeOwned`",
    label = "the result is stored and replayed, so this type must be serializable",
    note = "derive them: `#[derive(serde::Serialize, serde::Deserialize)]`"
)]
pub trait StorableOutput: Serialize + DeserializeOwned {}
impl<T: Serialize + DeserializeOwned> StorableOutput for T {}

/// An `#[idempotent]` function must be able to return idem's own errors.
#[diagnostic::on_unimplemented(
    message = "the error type `{Self}` must implement `From<idem_runtime::Error>`",
    label = "an #[idempotent] call can fail before the body runs (in progress, key reused, store down), so this error must hold an `idem_runtime::Error`",
    note = "add `impl From<idem_runtime::Error> for {Self}`"
)]
pub trait IdempotentError: From<Error> {}
impl<E: From<Error>> IdempotentError for E {}

/// With `cache_errors`, errors are stored and replayed too.
#[diagnostic::on_unimplemented(
    message = "`cache_errors` needs an error type that implements `Serialize` and `DeserializeOwned`, and `{Self}` does not",
    label = "cached errors are stored and replayed, so this type must be serializable",
    note = "derive them on the error type, or remove `cache_errors`"
)]
pub trait StorableError: Serialize + DeserializeOwned {}
impl<E: Serialize + DeserializeOwned> StorableError for E {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let bytes = encode_ok(&vec![1, 2]).unwrap();
        assert_eq!(bytes, br#"{"ok":[1,2]}"#);
        assert_eq!(decode_ok::<Vec<i32>>(&bytes).unwrap(), vec![1, 2]);
        let bytes = encode_err(&"nope").unwrap();
        assert_eq!(decode::<u8, String>(&bytes).unwrap(), Err("nope".into()));
    }

    #[test]
    fn corrupt_records_are_codec_errors() {
        assert!(matches!(
            decode_ok::<u8>(b"\xff\x00garbage"),
            Err(Error::Codec(_))
        ));
        assert!(matches!(
            decode_ok::<u8>(br#"{"ok":"str"}"#),
            Err(Error::Codec(_))
        ));
        assert!(matches!(
            decode_ok::<u8>(br#"{"err":1}"#),
            Err(Error::Codec(_))
        ));
        assert!(matches!(decode::<u8, u8>(b""), Err(Error::Codec(_))));
    }
}
