//! [`KeyBuilder`] and [`FingerprintBuilder`]: parts in, one digest out, with
//! the optional time window of a key.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use sha2::{Digest as _, Sha256};

use super::encoding::{encode_into, is_missing};
use super::{Digest, Key};
use crate::error::Error;

const KEY_DOMAIN: &[u8] = b"idem:key:v1";
const FINGERPRINT_DOMAIN: &[u8] = b"idem:fingerprint:v1";

/// Builds a [`Key`] from parts, each any `Serialize` value, and an optional window.
///
/// Like `http::request::Builder`, it carries the first error (a part that
/// cannot be encoded, or is `None` / `""`) to [`finish`](Self::finish), so parts
/// chain without a `?` each:
///
/// ```
/// use idem_runtime::key::KeyBuilder;
/// let key = KeyBuilder::new("orders").part(&42u64).part("sku-1").finish()?;
/// assert!(key.as_str().starts_with("orders:"));
/// assert!(KeyBuilder::new("orders").part("").finish().is_err());
/// # Ok::<(), idem_runtime::Error>(())
/// ```
#[derive(Debug)]
pub struct KeyBuilder<'n> {
    namespace: &'n str,
    parts: u64,
    buf: Vec<u8>,
    window: Option<(u64, u64)>,
    error: Option<Error>,
}

impl<'n> KeyBuilder<'n> {
    /// Starts a key in `namespace`.
    pub fn new(namespace: &'n str) -> Self {
        KeyBuilder {
            namespace,
            parts: 0,
            buf: Vec::with_capacity(64),
            window: None,
            error: None,
        }
    }

    /// A builder that already failed: [`finish`](Self::finish) returns `error`.
    pub(crate) fn failed(namespace: &'n str, error: Error) -> Self {
        KeyBuilder {
            error: Some(error),
            ..KeyBuilder::new(namespace)
        }
    }

    /// Adds one part. A part that is `None` or an empty string makes the key
    /// [`Error::MissingKey`]; one that cannot be encoded, [`Error::Codec`].
    pub fn part<T: Serialize + ?Sized>(mut self, value: &T) -> Self {
        if self.error.is_some() {
            return self;
        }
        let start = self.buf.len();
        match encode_into(&mut self.buf, value, true) {
            Ok(()) if is_missing(&self.buf[start..]) => self.error = Some(Error::MissingKey),
            Ok(()) => self.parts += 1,
            Err(err) => self.error = Some(err),
        }
        self
    }

    /// Adds the current UTC time bucket `floor(unix_time / window)` to the key.
    pub fn window(self, window: Duration) -> Self {
        self.window_at(window, SystemTime::now())
    }

    /// Adds the time bucket of `now` for `window` (for tests and replays of old events).
    pub fn window_at(mut self, window: Duration, now: SystemTime) -> Self {
        let window_ms = (window.as_millis() as u64).max(1);
        let now_ms = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.window = Some((window_ms, now_ms / window_ms));
        self
    }

    /// Hashes the parts into the final key; the first error instead, if a
    /// part failed, and [`Error::MissingKey`] for a key with no parts.
    pub fn finish(self) -> Result<Key, Error> {
        if let Some(error) = self.error {
            return Err(error);
        }
        if self.parts == 0 {
            return Err(Error::MissingKey);
        }
        let mut hasher = Sha256::new();
        hasher.update(KEY_DOMAIN);
        hasher.update(self.parts.to_be_bytes());
        hasher.update(&self.buf);
        if let Some((window_ms, bucket)) = self.window {
            hasher.update(b"w");
            hasher.update(window_ms.to_be_bytes());
            hasher.update(bucket.to_be_bytes());
        }
        Ok(Key::from_digest(
            self.namespace,
            Digest(hasher.finalize().into()),
        ))
    }
}

/// Builds a request fingerprint: the SHA-256 of the canonical encoding of its
/// parts. Like [`KeyBuilder`], it carries the first error to
/// [`finish`](Self::finish).
#[derive(Debug, Default)]
pub struct FingerprintBuilder {
    parts: u64,
    buf: Vec<u8>,
    error: Option<Error>,
}

impl FingerprintBuilder {
    /// Starts an empty fingerprint.
    pub fn new() -> Self {
        FingerprintBuilder {
            parts: 0,
            buf: Vec::with_capacity(64),
            error: None,
        }
    }

    /// Adds one part (`None` and empty values are allowed here).
    pub fn part<T: Serialize + ?Sized>(mut self, value: &T) -> Self {
        if self.error.is_none() {
            match encode_into(&mut self.buf, value, true) {
                Ok(()) => self.parts += 1,
                Err(err) => self.error = Some(err),
            }
        }
        self
    }

    /// Adds raw bytes as one part (for HTTP bodies and other byte payloads).
    pub fn bytes(mut self, bytes: &[u8]) -> Self {
        self.buf.push(b'y');
        self.buf
            .extend_from_slice(&(bytes.len() as u64).to_be_bytes());
        self.buf.extend_from_slice(bytes);
        self.parts += 1;
        self
    }

    /// Hashes the parts; the first error instead, if a part failed.
    pub fn finish(self) -> Result<Digest, Error> {
        match self.error {
            Some(error) => Err(error),
            None => Ok(self.finish_bytes()),
        }
    }

    /// Hashes the parts of a fingerprint built from [`bytes`](Self::bytes)
    /// only, which cannot fail.
    pub(crate) fn finish_bytes(self) -> Digest {
        debug_assert!(self.error.is_none(), "finish_bytes after a failed part");
        let mut hasher = Sha256::new();
        hasher.update(FINGERPRINT_DOMAIN);
        hasher.update(self.parts.to_be_bytes());
        hasher.update(&self.buf);
        Digest(hasher.finalize().into())
    }
}

/// The fingerprint of one `Serialize` value.
pub fn fingerprint<T: Serialize + ?Sized>(value: &T) -> Result<Digest, Error> {
    FingerprintBuilder::new().part(value).finish()
}

/// The canonical encoding of `value` (the bytes that are hashed), for inspection and tests.
pub fn canonical_bytes<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    encode_into(&mut out, value, false)?;
    Ok(out)
}
