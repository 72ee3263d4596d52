//! [`ClientKey`]: a key a client sends, validated at the service's boundary.

use std::fmt;

use crate::error::{Error, InvalidKey};

/// A validated client-supplied idempotency key: 1 to 255 visible ASCII characters.
///
/// Use it at a service boundary (the HTTP layer does) so a malformed key is an
/// [`Error::InvalidKey`] before anything is claimed.
///
/// ```
/// use idem_runtime::ClientKey;
/// let key = ClientKey::parse("8e03978e-40d5-43e8-bc93-6894a57f9324")?;
/// assert_eq!(key.as_str().len(), 36);
/// assert!(ClientKey::parse("has space").is_err());
/// # Ok::<(), idem_runtime::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct ClientKey(String);

impl ClientKey {
    /// The longest key accepted, in bytes.
    pub const MAX_LEN: usize = 255;

    /// Validates `key`: 1 to 255 characters, each visible ASCII (`!`..=`~`).
    pub fn parse(key: &str) -> Result<Self, Error> {
        Self::validate(key)?;
        Ok(ClientKey(key.to_owned()))
    }

    /// Parses an `Idempotency-Key` header value in either spelling: bare
    /// (`k-1`, as Stripe's clients send it) or as a Structured Field string
    /// (`"k-1"`, RFC 8941, as the IETF Idempotency-Key draft defines it, with
    /// `\"` and `\\` escapes). Both spellings of one key are the same key.
    /// Surrounding spaces and tabs are ignored. A value that starts with `"`
    /// must be a well-formed string with nothing after it (parameters such as
    /// `"k-1";a=1` are refused). The key itself must then be 1 to 255 visible
    /// ASCII characters, as for [`parse`](Self::parse).
    ///
    /// ```
    /// use idem_runtime::ClientKey;
    /// assert_eq!(ClientKey::from_header(b"\"q-1\"")?, ClientKey::parse("q-1")?);
    /// assert_eq!(ClientKey::from_header(br#""a\"b""#)?.as_str(), "a\"b");
    /// assert!(ClientKey::from_header(b"\"unterminated").is_err());
    /// # Ok::<(), idem_runtime::Error>(())
    /// ```
    pub fn from_header(value: &[u8]) -> Result<Self, Error> {
        let trimmed = trim_ows(value);
        if trimmed.first() != Some(&b'"') {
            let text = std::str::from_utf8(trimmed).map_err(|_| {
                let position = trimmed.iter().position(|b| !b.is_ascii()).unwrap_or(0);
                Error::InvalidKey(InvalidKey::InvalidCharacter { position })
            })?;
            return Self::parse(text);
        }
        let mut key = String::with_capacity(trimmed.len());
        let mut bytes = trimmed[1..].iter().copied();
        loop {
            match bytes.next() {
                None => return Err(quoted("it has no closing quote")),
                Some(b'"') => break,
                Some(b'\\') => match bytes.next() {
                    Some(c @ (b'"' | b'\\')) => key.push(c as char),
                    _ => return Err(quoted("a backslash may only escape `\"` or `\\`")),
                },
                Some(c @ 0x20..=0x7e) => key.push(c as char),
                Some(_) => return Err(quoted("it holds a byte that is not printable ASCII")),
            }
        }
        match bytes.next() {
            None => Self::parse(&key),
            Some(b';') => Err(quoted("parameters are not supported")),
            Some(_) => Err(quoted("there is more after the closing quote")),
        }
    }

    /// Checks `key` without allocating.
    pub fn validate(key: &str) -> Result<(), InvalidKey> {
        if key.is_empty() {
            return Err(InvalidKey::Empty);
        }
        if let Some(position) = key.bytes().position(|b| !(b'!'..=b'~').contains(&b)) {
            return Err(InvalidKey::InvalidCharacter { position });
        }
        if key.len() > Self::MAX_LEN {
            return Err(InvalidKey::TooLong { len: key.len() });
        }
        Ok(())
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key as an owned `String`.
    pub fn into_string(self) -> String {
        self.0
    }
}

fn trim_ows(mut value: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = value {
        value = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = value {
        value = rest;
    }
    value
}

fn quoted(reason: &'static str) -> Error {
    Error::InvalidKey(InvalidKey::MalformedString { reason })
}

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Client keys may be personal data; show only their length.
        write!(f, "ClientKey(<{} chars>)", self.0.len())
    }
}

impl fmt::Display for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for ClientKey {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for ClientKey {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        ClientKey::parse(s)
    }
}

impl<'de> serde::Deserialize<'de> for ClientKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ClientKey::validate(&s).map_err(serde::de::Error::custom)?;
        Ok(ClientKey(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_keys_are_validated() {
        assert!(ClientKey::parse("a").is_ok());
        assert!(ClientKey::parse(&"x".repeat(255)).is_ok());
        assert!(matches!(
            ClientKey::validate(&"x".repeat(256)),
            Err(InvalidKey::TooLong { len: 256 })
        ));
        assert_eq!(ClientKey::validate(""), Err(InvalidKey::Empty));
        assert_eq!(
            ClientKey::validate("ab c"),
            Err(InvalidKey::InvalidCharacter { position: 2 })
        );
        assert!(ClientKey::validate("é").is_err());
        assert!(ClientKey::validate("a\n").is_err());
        assert!(matches!(ClientKey::parse(""), Err(Error::InvalidKey(_))));
    }
}
