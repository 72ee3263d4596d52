//! How outcomes are encoded in a record: JSON, so `psql` or `redis-cli` can read them.
//!
//! A stored outcome is `{"ok": <T>}` or, when errors are cached, `{"err": <E>}`.
//! Anything else in the record (corrupt bytes, another type's shape) decodes to
//! [`Error::Codec`]: never a panic, never a rerun.

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
pub fn encode_ok<T: Serialize>(value: &T) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(&StoredRef::<T, ()>::Ok(value))
        .map_err(|e| Error::codec(format!("cannot encode the result: {e}")))
}

/// Encodes a failed outcome as `{"err": error}`.
pub fn encode_err<E: Serialize>(error: &E) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(&StoredRef::<(), E>::Err(error))
        .map_err(|e| Error::codec(format!("cannot encode the error: {e}")))
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

fn corrupt(e: serde_json::Error) -> Error {
    Error::codec(format!(
        "the stored outcome is corrupt or was written by an incompatible type: {e}"
    ))
}

/// Decides which outcomes are stored and how they are encoded and decoded.
///
/// The macro picks one: [`ReleaseErrors`] (the default), [`CacheAllErrors`]
/// (`cache_errors`) or [`CacheErrorsIf`] (`cache_errors = path`).
pub trait OutcomePolicy<T, E>: Send + Sync {
    /// The bytes to store for `outcome`, or `None` to release the claim instead.
    fn encode(&self, outcome: &Result<T, E>) -> Option<Result<Vec<u8>, Error>>;
    /// Decodes stored bytes back into the outcome to replay.
    fn decode(&self, bytes: &[u8]) -> Result<Result<T, E>, Error>;
}

/// Store successes only; an `Err` releases the claim so a retry runs again.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReleaseErrors;

impl<T: Serialize + DeserializeOwned, E> OutcomePolicy<T, E> for ReleaseErrors {
    fn encode(&self, outcome: &Result<T, E>) -> Option<Result<Vec<u8>, Error>> {
        outcome.as_ref().ok().map(encode_ok)
    }
    fn decode(&self, bytes: &[u8]) -> Result<Result<T, E>, Error> {
        decode_ok(bytes).map(Ok)
    }
}

/// Store and replay every outcome, errors included.
#[derive(Debug, Clone, Copy, Default)]
pub struct CacheAllErrors;

impl<T, E> OutcomePolicy<T, E> for CacheAllErrors
where
    T: Serialize + DeserializeOwned,
    E: Serialize + DeserializeOwned,
{
    fn encode(&self, outcome: &Result<T, E>) -> Option<Result<Vec<u8>, Error>> {
        Some(match outcome {
            Ok(v) => encode_ok(v),
            Err(e) => encode_err(e),
        })
    }
    fn decode(&self, bytes: &[u8]) -> Result<Result<T, E>, Error> {
        decode(bytes)
    }
}

/// Store successes, and the errors for which the predicate returns `true`.
#[derive(Debug, Clone, Copy)]
pub struct CacheErrorsIf<F>(pub F);

impl<T, E, F> OutcomePolicy<T, E> for CacheErrorsIf<F>
where
    T: Serialize + DeserializeOwned,
    E: Serialize + DeserializeOwned,
    F: Fn(&E) -> bool + Send + Sync,
{
    fn encode(&self, outcome: &Result<T, E>) -> Option<Result<Vec<u8>, Error>> {
        match outcome {
            Ok(v) => Some(encode_ok(v)),
            Err(e) if (self.0)(e) => Some(encode_err(e)),
            Err(_) => None,
        }
    }
    fn decode(&self, bytes: &[u8]) -> Result<Result<T, E>, Error> {
        decode(bytes)
    }
}

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
