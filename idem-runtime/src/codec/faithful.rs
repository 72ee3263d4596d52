//! A check, before an outcome is stored, that JSON will give it back as it was.
//!
//! `serde_json` writes two kinds of values it cannot read back the same:
//! non-finite floats (NaN and ±infinity become `null`), and `Some(v)` where `v`
//! itself is written as `null` (`Some(None)`, `Some(())`, `Some` of a unit
//! struct or of `serde_json::Value::Null`), which reads back as `None`. Either
//! would become a record that replays a different value (or fails to decode)
//! for its whole ttl, so the codec refuses such an outcome before it is stored.
//!
//! The walk serializes nothing: it only visits the value the way `serde_json`
//! will, so it allocates nothing and costs a fraction of the encoding itself.

use std::fmt;

use serde::ser::{self, Serialize};

/// Why an outcome cannot be stored faithfully.
#[derive(Debug)]
pub(crate) struct Unfaithful(pub(crate) String);

impl fmt::Display for Unfaithful {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unfaithful {}

impl ser::Error for Unfaithful {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Unfaithful(msg.to_string())
    }
}

/// Checks that `value` survives a JSON round trip as itself.
pub(crate) fn check<T: Serialize + ?Sized>(value: &T) -> Result<(), Unfaithful> {
    value.serialize(Walk { in_some: false })
}

const NON_FINITE: &str = "it holds a NaN or infinite float, which JSON stores as null: \
     a replay would not return it (store such a value as a string, or map it to an Option or an enum)";
const SOME_NULL: &str = "it holds `Some(x)` where `x` is stored as null (`None`, `()`, a unit \
     struct or a JSON null), which would replay as `None` (use an enum, or a struct field, to tell them apart)";

/// Visits a value; `in_some` is true directly inside `Some` (through newtype structs,
/// which JSON writes as their content).
#[derive(Clone, Copy)]
struct Walk {
    in_some: bool,
}

impl Walk {
    fn child() -> Self {
        Walk { in_some: false }
    }

    fn null(self) -> Result<(), Unfaithful> {
        if self.in_some {
            Err(Unfaithful(SOME_NULL.into()))
        } else {
            Ok(())
        }
    }

    fn float(self, finite: bool) -> Result<(), Unfaithful> {
        if finite {
            Ok(())
        } else {
            Err(Unfaithful(NON_FINITE.into()))
        }
    }
}

/// Visits the elements, fields or entries of a compound value.
#[derive(Default)]
struct Children {
    /// A `serde_json::value::RawValue` directly inside `Some`: its text must not be `null`.
    raw_in_some: bool,
}

/// The struct name `serde_json` gives a `RawValue`, whose one field is its JSON text.
const RAW_VALUE: &str = "$serde_json::private::RawValue";

impl Children {
    fn visit<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Unfaithful> {
        value.serialize(Walk::child())
    }
}

macro_rules! scalars {
    ($($method:ident: $ty:ty),* $(,)?) => {
        $(fn $method(self, _v: $ty) -> Result<(), Unfaithful> { Ok(()) })*
    };
}

impl ser::Serializer for Walk {
    type Ok = ();
    type Error = Unfaithful;
    type SerializeSeq = Children;
    type SerializeTuple = Children;
    type SerializeTupleStruct = Children;
    type SerializeTupleVariant = Children;
    type SerializeMap = Children;
    type SerializeStruct = Children;
    type SerializeStructVariant = Children;

    scalars!(
        serialize_bool: bool, serialize_i8: i8, serialize_i16: i16, serialize_i32: i32,
        serialize_i64: i64, serialize_i128: i128, serialize_u8: u8, serialize_u16: u16,
        serialize_u32: u32, serialize_u64: u64, serialize_u128: u128, serialize_char: char,
        serialize_str: &str, serialize_bytes: &[u8],
    );

    fn serialize_f32(self, v: f32) -> Result<(), Unfaithful> {
        self.float(v.is_finite())
    }
    fn serialize_f64(self, v: f64) -> Result<(), Unfaithful> {
        self.float(v.is_finite())
    }
    fn serialize_none(self) -> Result<(), Unfaithful> {
        self.null()
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), Unfaithful> {
        value.serialize(Walk { in_some: true })
    }
    fn serialize_unit(self) -> Result<(), Unfaithful> {
        self.null()
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result<(), Unfaithful> {
        self.null()
    }
    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
    ) -> Result<(), Unfaithful> {
        Ok(())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<(), Unfaithful> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        value: &T,
    ) -> Result<(), Unfaithful> {
        value.serialize(Walk::child())
    }
    fn serialize_seq(self, _len: Option<usize>) -> Result<Children, Unfaithful> {
        Ok(Children::default())
    }
    fn serialize_tuple(self, _len: usize) -> Result<Children, Unfaithful> {
        Ok(Children::default())
    }
    fn serialize_tuple_struct(
        self,
        _name: &'static str,
        _len: usize,
    ) -> Result<Children, Unfaithful> {
        Ok(Children::default())
    }
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Children, Unfaithful> {
        Ok(Children::default())
    }
    fn serialize_map(self, _len: Option<usize>) -> Result<Children, Unfaithful> {
        Ok(Children::default())
    }
    fn serialize_struct(self, name: &'static str, _len: usize) -> Result<Children, Unfaithful> {
        Ok(Children {
            raw_in_some: self.in_some && name == RAW_VALUE,
        })
    }
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Children, Unfaithful> {
        Ok(Children::default())
    }
}

impl ser::SerializeSeq for Children {
    type Ok = ();
    type Error = Unfaithful;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Unfaithful> {
        self.visit(value)
    }
    fn end(self) -> Result<(), Unfaithful> {
        Ok(())
    }
}

impl ser::SerializeTuple for Children {
    type Ok = ();
    type Error = Unfaithful;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Unfaithful> {
        self.visit(value)
    }
    fn end(self) -> Result<(), Unfaithful> {
        Ok(())
    }
}

impl ser::SerializeTupleStruct for Children {
    type Ok = ();
    type Error = Unfaithful;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Unfaithful> {
        self.visit(value)
    }
    fn end(self) -> Result<(), Unfaithful> {
        Ok(())
    }
}

impl ser::SerializeTupleVariant for Children {
    type Ok = ();
    type Error = Unfaithful;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Unfaithful> {
        self.visit(value)
    }
    fn end(self) -> Result<(), Unfaithful> {
        Ok(())
    }
}

impl ser::SerializeMap for Children {
    type Ok = ();
    type Error = Unfaithful;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), Unfaithful> {
        self.visit(key)
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Unfaithful> {
        self.visit(value)
    }
    fn end(self) -> Result<(), Unfaithful> {
        Ok(())
    }
}

impl ser::SerializeStruct for Children {
    type Ok = ();
    type Error = Unfaithful;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        _key: &'static str,
        value: &T,
    ) -> Result<(), Unfaithful> {
        if self.raw_in_some {
            // The field is the raw JSON text; `Some(raw null)` is written as `null`.
            if let Ok(serde_json::Value::String(text)) = serde_json::to_value(value) {
                if text.trim() == "null" {
                    return Err(Unfaithful(SOME_NULL.into()));
                }
            }
        }
        self.visit(value)
    }
    fn end(self) -> Result<(), Unfaithful> {
        Ok(())
    }
}

impl ser::SerializeStructVariant for Children {
    type Ok = ();
    type Error = Unfaithful;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        _key: &'static str,
        value: &T,
    ) -> Result<(), Unfaithful> {
        self.visit(value)
    }
    fn end(self) -> Result<(), Unfaithful> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::check;

    #[derive(serde::Serialize)]
    struct Unit;

    #[derive(serde::Serialize)]
    struct Wrapper(Option<u8>);

    #[test]
    fn refuses_what_json_would_change() {
        assert!(check(&f64::NAN).is_err());
        assert!(check(&vec![1.0, f64::INFINITY]).is_err());
        assert!(check(&Some(f32::NEG_INFINITY)).is_err());
        assert!(check(&Some(None::<u8>)).is_err());
        assert!(check(&Some(())).is_err());
        assert!(check(&Some(Unit)).is_err());
        assert!(check(&Some(Wrapper(None))).is_err());
        assert!(check(&Some(serde_json::Value::Null)).is_err());
        assert!(check(&vec![Some(Some(None::<u8>))]).is_err());
    }

    #[test]
    fn accepts_what_json_gives_back() {
        assert!(check(&1.5f64).is_ok());
        assert!(check(&f64::MIN_POSITIVE).is_ok());
        assert!(check(&-0.0f64).is_ok());
        assert!(check(&None::<u8>).is_ok());
        assert!(check(&()).is_ok());
        assert!(check(&Some(Some(1u8))).is_ok());
        assert!(check(&Some(vec![None::<u8>])).is_ok());
        assert!(check(&Some(Wrapper(Some(1)))).is_ok());
        assert!(check(&vec![None::<u8>, Some(2)]).is_ok());
        assert!(check(&serde_json::json!({"a": null})).is_ok());
    }
}
