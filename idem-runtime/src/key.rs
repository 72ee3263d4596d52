//! Key derivation: the canonical encoding, SHA-256 digests, time windows and
//! client-supplied keys.
//!
//! A key is made of parts (any `Serialize` values). Each part is written in a
//! canonical, type-tagged, length-prefixed encoding (see [`encoding`](self#encoding)),
//! the whole is hashed with SHA-256, and the record is stored under
//! `namespace:hex(digest)`. The raw key material never leaves this module: logs,
//! stores and errors only ever see the digest.
//!
//! # Encoding
//!
//! | value | bytes |
//! |---|---|
//! | `bool` | `b` + `0`/`1` |
//! | any integer | `i` + 16-byte big-endian `i128` (`U` + `u128` above `i128::MAX`) — so `1u8` and `1i64` are the same key |
//! | `f32`, `f64` | `f` + big-endian `f64` bits (`-0.0` folded to `0.0`, one canonical NaN) |
//! | `str`, `char` | `s` + `u64` length + UTF-8 |
//! | bytes | `y` + `u64` length + bytes |
//! | `None` / `Some(v)` | `n` / `o` + `v` |
//! | `()`, unit struct | `u` |
//! | newtype struct | the inner value |
//! | seq, tuple, tuple struct | `l` + `u64` count + elements |
//! | set (`HashSet`, `BTreeSet`, any `*Set` or `*Bag`, `BinaryHeap`) | `S` + `u64` count + elements sorted by their encoding (so the hasher and the insertion order never matter) |
//! | map, struct | `m` + `u64` count + entries sorted by their encoded key (so `HashMap` order and field order never matter) |
//! | enum variant | `e` + name (unit) or `E` + name + payload |
//!
//! Sets are recognised by the type serde hands to `Serializer::collect_seq`,
//! which is how every std collection (and `hashbrown`, `indexmap`, `im`)
//! serializes itself. A hand-written `Serialize` impl that feeds an unordered
//! collection to `serialize_seq` element by element cannot be told from a
//! list: pass the set (or its `iter()`) to `collect_seq`, or key on a
//! `BTreeSet` or a sorted `Vec`. serde also hides a set's type where it buffers
//! a value before writing it — inside `#[serde(flatten)]` fields and
//! internally, adjacently or un-tagged enums — so there a `HashSet` is written
//! in its iteration order: use a `BTreeSet` (always in one order) in such
//! positions.
//!
//! This is encoding version 2. Version 1 wrote sets as lists in iteration
//! order (so a `HashSet` key changed from call to call); version 2 differs
//! from it only by the `S` tag, which version 1 never wrote, so every key
//! without a set keeps its digest, and no version 2 digest can equal a
//! version 1 digest of different material. The domain string stays `v1`.
//!
//! A whole key is `idem:key:v1`, the number of parts, the parts, then (with a
//! window) `w` + window length in ms + bucket number. At the top level of a part
//! `Some(v)` encodes as `v`, so a key field may become optional without changing
//! digests; a part that is `None` or `""` is [`Error::MissingKey`].

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::ser::{self, Serialize};
use sha2::{Digest as _, Sha256};

use crate::error::{Error, InvalidKey};

/// A SHA-256 digest of canonically encoded key or fingerprint material.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The digest as 64 lowercase hex characters.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        push_hex(&mut s, &self.0);
        s
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Parses 64 hex characters back into a digest.
    pub fn from_hex(hex: &str) -> Option<Self> {
        let bytes = hex.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            out[i] = (hi * 16 + lo) as u8;
        }
        Some(Digest(out))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.to_hex())
    }
}

fn push_hex(s: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 0xf) as usize] as char);
    }
}

/// A derived idempotency key: the namespace and the digest of the key material.
///
/// Its [`storage key`](Key::as_str) is `namespace:hex(digest)`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Key {
    /// Shared, so the engine hands the key to the running attempt without copying.
    storage: std::sync::Arc<str>,
    namespace_len: usize,
    digest: Digest,
}

impl Key {
    /// Builds the key for `namespace` from an already computed digest.
    pub fn from_digest(namespace: &str, digest: Digest) -> Self {
        let mut storage = String::with_capacity(namespace.len() + 65);
        storage.push_str(namespace);
        storage.push(':');
        push_hex(&mut storage, &digest.0);
        Key {
            storage: storage.into(),
            namespace_len: namespace.len(),
            digest,
        }
    }

    /// Derives a key from one `Serialize` value (a convenience over [`KeyBuilder`]).
    pub fn derive<T: Serialize + ?Sized>(namespace: &str, value: &T) -> Result<Self, Error> {
        Ok(KeyBuilder::new(namespace).part(value)?.finish())
    }

    /// The storage key, `namespace:hex(digest)`.
    pub fn as_str(&self) -> &str {
        &self.storage
    }

    /// The namespace part of the key.
    pub fn namespace(&self) -> &str {
        &self.storage[..self.namespace_len]
    }

    /// The digest of the key material.
    pub fn digest(&self) -> &Digest {
        &self.digest
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.storage)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({})", self.storage)
    }
}

const KEY_DOMAIN: &[u8] = b"idem:key:v1";
const FINGERPRINT_DOMAIN: &[u8] = b"idem:fingerprint:v1";

/// Builds a [`Key`] from parts, each any `Serialize` value, and an optional window.
///
/// ```
/// use idem_runtime::key::KeyBuilder;
/// let key = KeyBuilder::new("orders").part(&42u64)?.part("sku-1")?.finish();
/// assert!(key.as_str().starts_with("orders:"));
/// # Ok::<(), idem_runtime::Error>(())
/// ```
#[derive(Debug)]
pub struct KeyBuilder<'n> {
    namespace: &'n str,
    parts: u64,
    buf: Vec<u8>,
    window: Option<(u64, u64)>,
}

impl<'n> KeyBuilder<'n> {
    /// Starts a key in `namespace`.
    pub fn new(namespace: &'n str) -> Self {
        KeyBuilder {
            namespace,
            parts: 0,
            buf: Vec::with_capacity(64),
            window: None,
        }
    }

    /// Adds one part. A part that is `None` or an empty string is [`Error::MissingKey`].
    pub fn part<T: Serialize + ?Sized>(mut self, value: &T) -> Result<Self, Error> {
        let start = self.buf.len();
        encode_into(&mut self.buf, value, true)?;
        if is_missing(&self.buf[start..]) {
            return Err(Error::MissingKey);
        }
        self.parts += 1;
        Ok(self)
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

    /// Hashes the parts into the final key.
    pub fn finish(self) -> Key {
        let mut hasher = Sha256::new();
        hasher.update(KEY_DOMAIN);
        hasher.update(self.parts.to_be_bytes());
        hasher.update(&self.buf);
        if let Some((window_ms, bucket)) = self.window {
            hasher.update(b"w");
            hasher.update(window_ms.to_be_bytes());
            hasher.update(bucket.to_be_bytes());
        }
        Key::from_digest(self.namespace, Digest(hasher.finalize().into()))
    }

    /// Like [`finish`](Self::finish), but a key with no parts is [`Error::MissingKey`].
    pub fn try_finish(self) -> Result<Key, Error> {
        if self.parts == 0 {
            return Err(Error::MissingKey);
        }
        Ok(self.finish())
    }
}

/// Builds a request fingerprint: the SHA-256 of the canonical encoding of its parts.
#[derive(Debug, Default)]
pub struct FingerprintBuilder {
    parts: u64,
    buf: Vec<u8>,
}

impl FingerprintBuilder {
    /// Starts an empty fingerprint.
    pub fn new() -> Self {
        FingerprintBuilder {
            parts: 0,
            buf: Vec::with_capacity(64),
        }
    }

    /// Adds one part (`None` and empty values are allowed here).
    pub fn part<T: Serialize + ?Sized>(mut self, value: &T) -> Result<Self, Error> {
        encode_into(&mut self.buf, value, true)?;
        self.parts += 1;
        Ok(self)
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

    /// Hashes the parts.
    pub fn finish(self) -> Digest {
        let mut hasher = Sha256::new();
        hasher.update(FINGERPRINT_DOMAIN);
        hasher.update(self.parts.to_be_bytes());
        hasher.update(&self.buf);
        Digest(hasher.finalize().into())
    }
}

/// The fingerprint of one `Serialize` value.
pub fn fingerprint<T: Serialize + ?Sized>(value: &T) -> Result<Digest, Error> {
    Ok(FingerprintBuilder::new().part(value)?.finish())
}

/// The canonical encoding of `value` (the bytes that are hashed), for inspection and tests.
pub fn canonical_bytes<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    encode_into(&mut out, value, false)?;
    Ok(out)
}

/// Whether a collection type (as `type_name` spells the `collect_seq` argument,
/// e.g. `&std::collections::hash::set::HashSet<u8, RandomState>`) is unordered.
fn is_unordered(type_name: &str) -> bool {
    let mut name = type_name;
    while let Some(rest) = name.strip_prefix('&') {
        name = rest.strip_prefix("mut ").unwrap_or(rest);
    }
    // A slice or tuple is ordered, whatever its elements are (`&[BTreeSet<u8>]`).
    if name.starts_with('[') || name.starts_with('(') {
        return false;
    }
    let path = name.split('<').next().unwrap_or(name);
    let mut segments = path.rsplit("::");
    let last = segments.next().unwrap_or(path);
    if last.ends_with("Set") || last.ends_with("Bag") || last == "BinaryHeap" {
        return true;
    }
    // A set's own iterators (`collect_seq(self.set.iter())`): std's
    // `hash::set::Iter`, `btree::set::Iter`, `binary_heap::Iter`, hashbrown's
    // `set::Iter`, and `*_set` modules.
    let module = segments.next().unwrap_or("");
    matches!(last, "Iter" | "IntoIter" | "Drain")
        && (module == "set" || module.ends_with("_set") || module == "binary_heap")
}

fn is_missing(encoded: &[u8]) -> bool {
    encoded == b"n" || encoded == b"s\0\0\0\0\0\0\0\0"
}

fn encode_into<T: Serialize + ?Sized>(
    out: &mut Vec<u8>,
    value: &T,
    top: bool,
) -> Result<(), Error> {
    value
        .serialize(&mut Encoder { out, top })
        .map_err(|e| Error::codec(format!("cannot encode key material: {}", e.0)))
}

/// Why a value could not be canonically encoded.
#[derive(Debug)]
pub struct EncodeError(String);

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for EncodeError {}

impl ser::Error for EncodeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        EncodeError(msg.to_string())
    }
}

struct Encoder<'a> {
    out: &'a mut Vec<u8>,
    /// True while at the top of a key part, where `Some(v)` is written as `v`.
    top: bool,
}

impl Encoder<'_> {
    fn len(&mut self, n: usize) {
        self.out.extend_from_slice(&(n as u64).to_be_bytes());
    }

    fn str(&mut self, s: &str) {
        self.out.push(b's');
        self.len(s.len());
        self.out.extend_from_slice(s.as_bytes());
    }

    fn int(&mut self, v: i128) -> Result<(), EncodeError> {
        self.top = false;
        self.out.push(b'i');
        self.out.extend_from_slice(&v.to_be_bytes());
        Ok(())
    }

    fn float(&mut self, v: f64) -> Result<(), EncodeError> {
        self.top = false;
        let v = if v == 0.0 {
            0.0
        } else if v.is_nan() {
            f64::NAN
        } else {
            v
        };
        self.out.push(b'f');
        self.out.extend_from_slice(&v.to_bits().to_be_bytes());
        Ok(())
    }

    fn variant(&mut self, tag: u8, name: &str) {
        self.top = false;
        self.out.push(tag);
        self.len(name.len());
        self.out.extend_from_slice(name.as_bytes());
    }

    /// Starts a sequence whose length may be unknown; returns where to patch it.
    fn begin_seq(&mut self, tag: u8) -> usize {
        self.top = false;
        self.out.push(tag);
        let at = self.out.len();
        self.len(0);
        at
    }
}

/// A sequence being written: the count is patched in at the end.
struct SeqEncoder<'a, 'b> {
    enc: &'b mut Encoder<'a>,
    count_at: usize,
    count: u64,
}

impl SeqEncoder<'_, '_> {
    fn element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), EncodeError> {
        self.count += 1;
        value.serialize(&mut Encoder {
            out: self.enc.out,
            top: false,
        })
    }

    fn end(self) -> Result<(), EncodeError> {
        self.enc.out[self.count_at..self.count_at + 8].copy_from_slice(&self.count.to_be_bytes());
        Ok(())
    }
}

/// A map or struct being written: entries are buffered, then sorted by encoded key.
struct MapEncoder<'a, 'b> {
    enc: &'b mut Encoder<'a>,
    entries: Vec<(Vec<u8>, Vec<u8>)>,
    pending_key: Option<Vec<u8>>,
}

impl MapEncoder<'_, '_> {
    fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, EncodeError> {
        let mut buf = Vec::new();
        value.serialize(&mut Encoder {
            out: &mut buf,
            top: false,
        })?;
        Ok(buf)
    }

    fn field<T: Serialize + ?Sized>(&mut self, name: &str, value: &T) -> Result<(), EncodeError> {
        let mut k = Vec::with_capacity(name.len() + 9);
        Encoder {
            out: &mut k,
            top: false,
        }
        .str(name);
        self.entries.push((k, Self::encode(value)?));
        Ok(())
    }

    fn end(mut self) -> Result<(), EncodeError> {
        self.entries.sort_unstable();
        self.enc.out.push(b'm');
        self.enc.len(self.entries.len());
        for (k, v) in &self.entries {
            self.enc.out.extend_from_slice(k);
            self.enc.out.extend_from_slice(v);
        }
        Ok(())
    }
}

impl<'a, 'b> ser::Serializer for &'b mut Encoder<'a> {
    type Ok = ();
    type Error = EncodeError;
    type SerializeSeq = SeqEncoder<'a, 'b>;
    type SerializeTuple = SeqEncoder<'a, 'b>;
    type SerializeTupleStruct = SeqEncoder<'a, 'b>;
    type SerializeTupleVariant = SeqEncoder<'a, 'b>;
    type SerializeMap = MapEncoder<'a, 'b>;
    type SerializeStruct = MapEncoder<'a, 'b>;
    type SerializeStructVariant = MapEncoder<'a, 'b>;

    fn serialize_bool(self, v: bool) -> Result<(), EncodeError> {
        self.top = false;
        self.out.extend_from_slice(&[b'b', v as u8]);
        Ok(())
    }
    fn serialize_i8(self, v: i8) -> Result<(), EncodeError> {
        self.int(v.into())
    }
    fn serialize_i16(self, v: i16) -> Result<(), EncodeError> {
        self.int(v.into())
    }
    fn serialize_i32(self, v: i32) -> Result<(), EncodeError> {
        self.int(v.into())
    }
    fn serialize_i64(self, v: i64) -> Result<(), EncodeError> {
        self.int(v.into())
    }
    fn serialize_i128(self, v: i128) -> Result<(), EncodeError> {
        self.int(v)
    }
    fn serialize_u8(self, v: u8) -> Result<(), EncodeError> {
        self.int(v.into())
    }
    fn serialize_u16(self, v: u16) -> Result<(), EncodeError> {
        self.int(v.into())
    }
    fn serialize_u32(self, v: u32) -> Result<(), EncodeError> {
        self.int(v.into())
    }
    fn serialize_u64(self, v: u64) -> Result<(), EncodeError> {
        self.int(v.into())
    }
    fn serialize_u128(self, v: u128) -> Result<(), EncodeError> {
        match i128::try_from(v) {
            Ok(v) => self.int(v),
            Err(_) => {
                self.top = false;
                self.out.push(b'U');
                self.out.extend_from_slice(&v.to_be_bytes());
                Ok(())
            }
        }
    }
    fn serialize_f32(self, v: f32) -> Result<(), EncodeError> {
        self.float(v.into())
    }
    fn serialize_f64(self, v: f64) -> Result<(), EncodeError> {
        self.float(v)
    }
    fn serialize_char(self, v: char) -> Result<(), EncodeError> {
        self.top = false;
        self.str(v.encode_utf8(&mut [0; 4]));
        Ok(())
    }
    fn serialize_str(self, v: &str) -> Result<(), EncodeError> {
        self.top = false;
        self.str(v);
        Ok(())
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<(), EncodeError> {
        self.top = false;
        self.out.push(b'y');
        self.len(v.len());
        self.out.extend_from_slice(v);
        Ok(())
    }
    fn serialize_none(self) -> Result<(), EncodeError> {
        self.top = false;
        self.out.push(b'n');
        Ok(())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), EncodeError> {
        if !self.top {
            self.out.push(b'o');
        }
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<(), EncodeError> {
        self.top = false;
        self.out.push(b'u');
        Ok(())
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result<(), EncodeError> {
        self.serialize_unit()
    }
    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<(), EncodeError> {
        self.variant(b'e', variant);
        Ok(())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<(), EncodeError> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), EncodeError> {
        self.variant(b'E', variant);
        value.serialize(self)
    }
    /// Every std collection serializes through here with `I` = a reference to
    /// the collection, so its type says whether the order is meaningful. Sets
    /// (`HashSet`, `BTreeSet`, any `*Set`, `BinaryHeap`, any `*Bag`) are written
    /// as `S` + count + elements sorted by their encoding, so the hasher and the
    /// insertion order never reach the digest; every other sequence keeps its order.
    fn collect_seq<I>(self, iter: I) -> Result<(), EncodeError>
    where
        I: IntoIterator,
        I::Item: Serialize,
    {
        if is_unordered(std::any::type_name::<I>()) {
            self.top = false;
            let mut elements = iter
                .into_iter()
                .map(|e| MapEncoder::encode(&e))
                .collect::<Result<Vec<_>, _>>()?;
            elements.sort_unstable();
            self.out.push(b'S');
            self.len(elements.len());
            for e in &elements {
                self.out.extend_from_slice(e);
            }
            return Ok(());
        }
        let mut seq = SeqEncoder {
            count_at: self.begin_seq(b'l'),
            enc: self,
            count: 0,
        };
        for e in iter {
            seq.element(&e)?;
        }
        seq.end()
    }
    fn serialize_seq(self, _len: Option<usize>) -> Result<Self::SerializeSeq, EncodeError> {
        let count_at = self.begin_seq(b'l');
        Ok(SeqEncoder {
            enc: self,
            count_at,
            count: 0,
        })
    }
    fn serialize_tuple(self, len: usize) -> Result<Self::SerializeTuple, EncodeError> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_struct(
        self,
        _name: &'static str,
        len: usize,
    ) -> Result<Self::SerializeTupleStruct, EncodeError> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self::SerializeTupleVariant, EncodeError> {
        self.variant(b'E', variant);
        self.serialize_seq(Some(len))
    }
    fn serialize_map(self, len: Option<usize>) -> Result<Self::SerializeMap, EncodeError> {
        self.top = false;
        Ok(MapEncoder {
            enc: self,
            entries: Vec::with_capacity(len.unwrap_or(0)),
            pending_key: None,
        })
    }
    fn serialize_struct(
        self,
        _name: &'static str,
        len: usize,
    ) -> Result<Self::SerializeStruct, EncodeError> {
        self.serialize_map(Some(len))
    }
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self::SerializeStructVariant, EncodeError> {
        self.variant(b'E', variant);
        self.serialize_map(Some(len))
    }
}

impl ser::SerializeSeq for SeqEncoder<'_, '_> {
    type Ok = ();
    type Error = EncodeError;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), EncodeError> {
        self.element(value)
    }
    fn end(self) -> Result<(), EncodeError> {
        SeqEncoder::end(self)
    }
}

impl ser::SerializeTuple for SeqEncoder<'_, '_> {
    type Ok = ();
    type Error = EncodeError;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), EncodeError> {
        self.element(value)
    }
    fn end(self) -> Result<(), EncodeError> {
        SeqEncoder::end(self)
    }
}

impl ser::SerializeTupleStruct for SeqEncoder<'_, '_> {
    type Ok = ();
    type Error = EncodeError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), EncodeError> {
        self.element(value)
    }
    fn end(self) -> Result<(), EncodeError> {
        SeqEncoder::end(self)
    }
}

impl ser::SerializeTupleVariant for SeqEncoder<'_, '_> {
    type Ok = ();
    type Error = EncodeError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), EncodeError> {
        self.element(value)
    }
    fn end(self) -> Result<(), EncodeError> {
        SeqEncoder::end(self)
    }
}

impl ser::SerializeMap for MapEncoder<'_, '_> {
    type Ok = ();
    type Error = EncodeError;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), EncodeError> {
        self.pending_key = Some(Self::encode(key)?);
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), EncodeError> {
        let key = self
            .pending_key
            .take()
            .ok_or_else(|| EncodeError("map value without a key".into()))?;
        self.entries.push((key, Self::encode(value)?));
        Ok(())
    }
    fn end(self) -> Result<(), EncodeError> {
        MapEncoder::end(self)
    }
}

impl ser::SerializeStruct for MapEncoder<'_, '_> {
    type Ok = ();
    type Error = EncodeError;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        name: &'static str,
        value: &T,
    ) -> Result<(), EncodeError> {
        self.field(name, value)
    }
    fn end(self) -> Result<(), EncodeError> {
        MapEncoder::end(self)
    }
}

impl ser::SerializeStructVariant for MapEncoder<'_, '_> {
    type Ok = ();
    type Error = EncodeError;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        name: &'static str,
        value: &T,
    ) -> Result<(), EncodeError> {
        self.field(name, value)
    }
    fn end(self) -> Result<(), EncodeError> {
        MapEncoder::end(self)
    }
}

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
    use std::collections::{BTreeMap, HashMap};

    fn key<T: Serialize + ?Sized>(v: &T) -> String {
        Key::derive("t", v).unwrap().as_str().to_owned()
    }

    #[test]
    fn tuples_with_shifted_boundaries_differ() {
        assert_ne!(key(&("ab", "c")), key(&("a", "bc")));
    }

    #[test]
    fn integer_widths_and_signs_agree() {
        assert_eq!(key(&1u8), key(&1i64));
        assert_eq!(key(&7u128), key(&7i32));
        assert_ne!(key(&1u64), key(&2u64));
        assert_ne!(key(&u128::MAX), key(&(i128::MAX)));
    }

    #[test]
    fn maps_are_order_independent() {
        let mut a = HashMap::new();
        let mut b = BTreeMap::new();
        for i in 0..50 {
            a.insert(format!("k{i}"), i);
            b.insert(format!("k{i}"), i);
        }
        assert_eq!(key(&a), key(&b));
    }

    #[test]
    fn sets_are_order_independent_whatever_the_hasher() {
        use std::collections::{BTreeSet, BinaryHeap, HashSet};
        use std::hash::BuildHasherDefault;
        let items: Vec<String> = (0..40).map(|i| format!("item-{i}")).collect();
        let tree: BTreeSet<String> = items.iter().cloned().collect();
        let expected = key(&tree);
        for round in 0..20 {
            // Each HashSet gets its own RandomState, so its iteration order differs.
            let set: HashSet<String> = items.iter().rev().cloned().collect();
            assert_eq!(key(&set), expected, "round {round}");
        }
        let fixed: HashSet<String, BuildHasherDefault<std::collections::hash_map::DefaultHasher>> =
            items.iter().cloned().collect();
        assert_eq!(key(&fixed), expected);
        let heap: BinaryHeap<String> = items.iter().cloned().collect();
        assert_eq!(key(&heap), expected);
        let refs: HashSet<&str> = items.iter().map(String::as_str).collect();
        assert_eq!(key(&refs), expected);
    }

    #[test]
    fn sets_nested_in_structs_options_and_enums_are_order_independent() {
        use std::collections::HashSet;
        #[derive(serde::Serialize)]
        enum Wrap {
            Tags { tags: Option<HashSet<u32>> },
            Pair(u8, Vec<HashSet<u32>>),
        }
        let a: HashSet<u32> = (0..100).collect();
        let b: HashSet<u32> = (0..100).rev().collect();
        assert_eq!(
            key(&(
                1,
                Wrap::Tags {
                    tags: Some(a.clone())
                }
            )),
            key(&(
                1,
                Wrap::Tags {
                    tags: Some(b.clone())
                }
            ))
        );
        assert_eq!(
            key(&Wrap::Pair(1, vec![a.clone(), b.clone()])),
            key(&Wrap::Pair(1, vec![b, a]))
        );
    }

    #[test]
    fn sequences_keep_their_order_and_differ_from_sets() {
        use std::collections::{BTreeSet, VecDeque};
        assert_ne!(key(&vec![1, 2]), key(&vec![2, 1]));
        assert_ne!(key(&[1, 2][..]), key(&[2, 1][..]));
        assert_ne!(key(&[1, 2]), key(&[2, 1]));
        assert_ne!(
            key(&VecDeque::from(vec![1, 2])),
            key(&VecDeque::from(vec![2, 1]))
        );
        assert_eq!(key(&vec![1, 2]), key(&[1, 2][..]));
        let set: BTreeSet<i32> = [1, 2].into();
        assert_ne!(key(&set), key(&vec![1, 2]), "a set is not a list");
    }

    #[test]
    fn collection_types_are_classified() {
        use std::collections::{BTreeSet, BinaryHeap, HashSet, LinkedList, VecDeque};
        use std::sync::Arc;
        fn of<T: ?Sized>(_: &T) -> &'static str {
            std::any::type_name::<&T>()
        }
        assert!(is_unordered(of(&HashSet::<u8>::new())));
        assert!(is_unordered(of(&BTreeSet::<Vec<u8>>::new())));
        assert!(is_unordered(of(&BinaryHeap::<u8>::new())));
        assert!(is_unordered("&&mut hashbrown::set::HashSet<u8>"));
        assert!(!is_unordered(of(&Vec::<HashSet<u8>>::new())));
        assert!(!is_unordered(of(&VecDeque::<u8>::new())));
        assert!(!is_unordered(of(&LinkedList::<u8>::new())));
        assert!(!is_unordered(of(&[0u8][..])));
        assert!(!is_unordered(of(&Arc::<[u8]>::from(vec![]))));
    }

    #[test]
    fn top_level_some_is_transparent_nested_is_not() {
        assert_eq!(key(&Some("x")), key(&"x"));
        assert_ne!(key(&vec![Some(1)]), key(&vec![1]));
    }

    #[test]
    fn none_and_empty_are_missing() {
        assert!(matches!(
            Key::derive("t", &None::<u32>),
            Err(Error::MissingKey)
        ));
        assert!(matches!(Key::derive("t", ""), Err(Error::MissingKey)));
        assert!(matches!(
            Key::derive("t", &Some("")),
            Err(Error::MissingKey)
        ));
        // nested None is an ordinary value
        assert!(Key::derive("t", &(1, None::<u32>)).is_ok());
    }

    #[test]
    fn negative_zero_and_nan_are_folded() {
        assert_eq!(key(&0.0f64), key(&-0.0f64));
        assert_eq!(key(&f64::NAN), key(&-f64::NAN));
    }

    #[test]
    fn windows_bucket_time() {
        let t0 = UNIX_EPOCH + Duration::from_secs(86_400 * 100 + 5);
        let t1 = UNIX_EPOCH + Duration::from_secs(86_400 * 100 + 80_000);
        let t2 = UNIX_EPOCH + Duration::from_secs(86_400 * 101 + 1);
        let day = Duration::from_secs(86_400);
        let k = |t| {
            KeyBuilder::new("w")
                .part(&1)
                .unwrap()
                .window_at(day, t)
                .finish()
        };
        assert_eq!(k(t0), k(t1));
        assert_ne!(k(t1), k(t2));
    }

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

    #[test]
    fn digest_hex_round_trips() {
        let d = fingerprint("x").unwrap();
        assert_eq!(Digest::from_hex(&d.to_hex()), Some(d));
        assert_eq!(Digest::from_hex("zz"), None);
    }
}
