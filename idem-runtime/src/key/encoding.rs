//! The canonical encoding: the bytes a key or fingerprint part becomes before
//! it is hashed (the format is described in the [key module docs](super)).
//!
//! **Changing a byte of this encoding is a breaking change**: every stored
//! record's key would change, and retries that span an upgrade would run
//! again. The golden vectors (`tests/encoding/golden.rs`, with
//! `digests.json` beside it) guard it; a change that must be made gets a new
//! version tag (as sets did, with `S`) so that no old digest can be produced
//! by new material.

use std::fmt;

use serde::ser::{self, Serialize};

use crate::error::Error;

/// Whether a collection type (as `type_name` spells the `collect_seq` argument,
/// e.g. `&std::collections::hash::set::HashSet<u8, RandomState>`) is unordered.
pub(super) fn is_unordered(type_name: &str) -> bool {
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

pub(super) fn is_missing(encoded: &[u8]) -> bool {
    encoded == b"n" || encoded == b"s\0\0\0\0\0\0\0\0"
}

pub(super) fn encode_into<T: Serialize + ?Sized>(
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
