//! The CBOR encoder (RFC 8949) behind the client's openmls storage codec: ciborium's data model,
//! except that a sequence whose elements are all `u8` is written as one byte string.
//!
//! Why: openmls's keys, secrets and tree nodes are `Vec<u8>`s, which serde hands to a serializer
//! as sequences of `u8`. ciborium writes those as arrays of integers (one to two bytes and one
//! encoder call per byte), and openmls rewrites its group state on every message and commit.
//!
//! Decoding stays with ciborium, which reads both forms for a sequence: its `deserialize_seq`
//! (and so `deserialize_tuple`, used by `[u8; N]`) presents a byte string as a sequence of `u8`,
//! and its `deserialize_bytes`/`deserialize_byte_buf` accept an array. Only self-describing
//! paths (`deserialize_any`, as in untagged enums) see the difference, which is why a byte string
//! is written only where the old form was a sequence, never for a tuple variant (ciborium reads
//! a variant's fields with `deserialize_any`).
//!
//! Everything else is written as ciborium writes it, byte for byte, apart from floats (always
//! 32 or 64 bits wide here, where ciborium picks the narrowest exact width): that keeps the
//! encoding of openmls's storage keys predictable, see [`recode_key`].

use std::fmt::Display;

use serde::ser::{self, Serialize};

const UNSIGNED: u8 = 0;
const NEGATIVE: u8 = 1;
const BYTES: u8 = 2;
const TEXT: u8 = 3;
const ARRAY: u8 = 4;
const MAP: u8 = 5;
const TAG: u8 = 6;

const FALSE: u8 = 0xf4;
const TRUE: u8 = 0xf5;
const NULL: u8 = 0xf6;
const FLOAT32: u8 = 0xfa;
const FLOAT64: u8 = 0xfb;

/// RFC 8949 §3.4.3 bignums, for 128-bit integers beyond 64 bits (as ciborium writes them).
const TAG_POSITIVE_BIGNUM: u64 = 2;
const TAG_NEGATIVE_BIGNUM: u64 = 3;

/// ciborium's names for a tagged value (`ciborium::tag`, `ciborium::Value::Tag`); written the
/// same way so that those types keep their meaning through this encoder.
const TAG_ENUM: &str = "@@TAG@@";
const TAGGED_VARIANT: &str = "@@TAGGED@@";
const UNTAGGED_VARIANT: &str = "@@UNTAGGED@@";

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("{0}")]
    Custom(String),
    #[error("a sequence element did not serialize as exactly one value")]
    ElementCount,
    #[error("a CBOR tag number must be an unsigned integer")]
    TagNumber,
}

impl ser::Error for EncodeError {
    fn custom<T: Display>(message: T) -> EncodeError {
        EncodeError::Custom(message.to_string())
    }
}

/// Encodes `value` as CBOR, with every all-`u8` sequence as a byte string.
pub fn to_vec<T: ?Sized + Serialize>(value: &T) -> Result<Vec<u8>, EncodeError> {
    let mut encoder = Encoder {
        out: Vec::with_capacity(128),
        raw_from: None,
    };
    value.serialize(&mut encoder)?;
    Ok(encoder.out)
}

/// Re-encodes a storage key written by plain ciborium (byte vectors as arrays of integers) the
/// way [`to_vec`] writes the same key, or returns `None` if `old` is not CBOR.
///
/// openmls_sqlite_storage looks rows up by the encoded key, so keys stored before the switch
/// must be rewritten once. The re-encoding goes through `ciborium::Value`, which serializes an
/// integer that fits a `u8` with `serialize_u8`: every non-empty array of such integers thus
/// becomes a byte string. For openmls's key types (byte vectors inside maps, plus plain
/// integers, strings and enum variants) that is exactly what [`to_vec`] writes for the typed
/// key; it would not be for a sequence of wider integers that all happen to be below 256.
pub fn recode_key(old: &[u8]) -> Option<Vec<u8>> {
    let value: ciborium::Value = ciborium::from_reader(old).ok()?;
    to_vec(&value).ok()
}

/// Appends an RFC 8949 §3 head: major type and argument, in the shortest form (as ciborium).
#[inline]
fn write_head(out: &mut Vec<u8>, major: u8, argument: u64) {
    let major = major << 5;
    if argument < 24 {
        out.push(major | argument as u8);
    } else if let Ok(argument) = u8::try_from(argument) {
        out.extend_from_slice(&[major | 24, argument]);
    } else if let Ok(argument) = u16::try_from(argument) {
        out.push(major | 25);
        out.extend_from_slice(&argument.to_be_bytes());
    } else if let Ok(argument) = u32::try_from(argument) {
        out.push(major | 26);
        out.extend_from_slice(&argument.to_be_bytes());
    } else {
        out.push(major | 27);
        out.extend_from_slice(&argument.to_be_bytes());
    }
}

struct Encoder {
    out: Vec<u8>,
    /// Set only while the value being serialized is an element of a sequence whose elements so
    /// far were all `u8`, written raw (as byte-string content) from this offset of `out` on.
    /// A `u8` element appends itself raw; any other value first turns those raw bytes back into
    /// integers, because its sequence has to be an array after all.
    raw_from: Option<usize>,
}

impl Encoder {
    #[inline]
    fn head(&mut self, major: u8, argument: u64) {
        write_head(&mut self.out, major, argument);
    }

    /// Called first by every value except a `u8` (see `raw_from`). Inlined, because it runs
    /// once per value and almost never has anything to do: a secret tree of 10,000 members is
    /// about 60,000 values, mostly `None`, written at every message.
    #[inline(always)]
    fn leave_raw(&mut self) {
        if let Some(start) = self.raw_from.take() {
            self.unraw(start);
        }
    }

    #[cold]
    #[inline(never)]
    fn unraw(&mut self, start: usize) {
        let raw = self.out.split_off(start);
        for byte in raw {
            self.head(UNSIGNED, u64::from(byte));
        }
    }

    fn unsigned(&mut self, value: u64) {
        self.leave_raw();
        self.head(UNSIGNED, value);
    }

    fn signed(&mut self, value: i64) {
        self.leave_raw();
        if value < 0 {
            // CBOR's negative integers carry -1 - value.
            self.head(NEGATIVE, value.unsigned_abs() - 1);
        } else {
            self.head(UNSIGNED, value.unsigned_abs());
        }
    }

    fn bignum(&mut self, tag: u64, magnitude: u128) {
        let bytes = magnitude.to_be_bytes();
        let first = bytes
            .iter()
            .position(|byte| *byte != 0)
            .unwrap_or(bytes.len());
        self.head(TAG, tag);
        self.byte_string(&bytes[first..]);
    }

    fn byte_string(&mut self, bytes: &[u8]) {
        self.head(BYTES, bytes.len() as u64);
        self.out.extend_from_slice(bytes);
    }

    fn text(&mut self, text: &str) {
        self.head(TEXT, text.len() as u64);
        self.out.extend_from_slice(text.as_bytes());
    }

    /// Opens an array or map. With a known length the head is written now (and corrected at the
    /// end if the element count differs); without one it is inserted at the end.
    fn open(&mut self, major: u8, length: Option<usize>, bytes_if_all_u8: bool) -> Collection<'_> {
        let head_at = self.out.len();
        if let Some(length) = length {
            self.head(major, length as u64);
        }
        let data_at = self.out.len();
        Collection {
            encoder: self,
            major,
            head_at,
            data_at,
            announced: length,
            count: 0,
            raw: bytes_if_all_u8,
            tag: TagState::NotATag,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TagState {
    NotATag,
    /// ciborium's tagged value: the tag number comes next, then the value.
    ExpectNumber,
    ExpectValue,
    Done,
}

/// An array or map being written; also a tagged value (ciborium models it as a tuple variant).
pub struct Collection<'a> {
    encoder: &'a mut Encoder,
    major: u8,
    head_at: usize,
    data_at: usize,
    announced: Option<usize>,
    /// Elements of an array, entries of a map.
    count: usize,
    /// An array whose elements have all been `u8` so far, written raw after the head.
    raw: bool,
    tag: TagState,
}

impl Collection<'_> {
    #[inline]
    fn element<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<(), EncodeError> {
        if self.raw {
            self.encoder.raw_from = Some(self.data_at);
            value.serialize(&mut *self.encoder)?;
            // Still set only if the element was a `u8` (every other value takes it).
            self.raw = self.encoder.raw_from.take().is_some();
        } else {
            // `raw_from` is unset here and stays so: only a `u8` element of a raw sequence
            // sets it, and that sequence takes it back after each element.
            value.serialize(&mut *self.encoder)?;
        }
        self.count += 1;
        Ok(())
    }

    fn entry_part<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<(), EncodeError> {
        value.serialize(&mut *self.encoder)
    }

    fn field<T: ?Sized + Serialize>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), EncodeError> {
        self.encoder.text(key);
        value.serialize(&mut *self.encoder)?;
        self.count += 1;
        Ok(())
    }

    fn tag_part<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<(), EncodeError> {
        match self.tag {
            TagState::ExpectNumber => {
                let at = self.encoder.out.len();
                value.serialize(&mut *self.encoder)?;
                // The number was written as an unsigned integer; a tag has the same argument
                // encoding under major type 6.
                match self.encoder.out.get_mut(at) {
                    Some(first) if *first >> 5 == UNSIGNED => *first |= TAG << 5,
                    _ => return Err(EncodeError::TagNumber),
                }
                self.tag = TagState::ExpectValue;
                Ok(())
            }
            TagState::ExpectValue => {
                value.serialize(&mut *self.encoder)?;
                self.tag = TagState::Done;
                Ok(())
            }
            TagState::NotATag | TagState::Done => Err(EncodeError::ElementCount),
        }
    }

    fn finish(self) -> Result<(), EncodeError> {
        match self.tag {
            TagState::NotATag => {}
            TagState::Done => return Ok(()),
            TagState::ExpectNumber | TagState::ExpectValue => {
                return Err(EncodeError::ElementCount);
            }
        }
        let out = &mut self.encoder.out;
        // An empty sequence stays an array: nothing says its elements would have been `u8`s.
        let major = if self.raw && self.count > 0 {
            if out.len() - self.data_at != self.count {
                return Err(EncodeError::ElementCount);
            }
            BYTES
        } else {
            self.major
        };
        if self.announced == Some(self.count) {
            // Arrays and byte strings encode their length alike: only the major type changes.
            if major != self.major
                && let Some(first) = out.get_mut(self.head_at)
            {
                *first = (*first & 0x1f) | (major << 5);
            }
        } else {
            let mut head = Vec::with_capacity(9);
            write_head(&mut head, major, self.count as u64);
            out.splice(self.head_at..self.data_at, head);
        }
        Ok(())
    }
}

impl<'a> ser::Serializer for &'a mut Encoder {
    type Ok = ();
    type Error = EncodeError;
    type SerializeSeq = Collection<'a>;
    type SerializeTuple = Collection<'a>;
    type SerializeTupleStruct = Collection<'a>;
    type SerializeTupleVariant = Collection<'a>;
    type SerializeMap = Collection<'a>;
    type SerializeStruct = Collection<'a>;
    type SerializeStructVariant = Collection<'a>;

    #[inline]
    fn serialize_bool(self, value: bool) -> Result<(), EncodeError> {
        self.leave_raw();
        self.out.push(if value { TRUE } else { FALSE });
        Ok(())
    }

    fn serialize_i8(self, value: i8) -> Result<(), EncodeError> {
        self.signed(value.into());
        Ok(())
    }

    fn serialize_i16(self, value: i16) -> Result<(), EncodeError> {
        self.signed(value.into());
        Ok(())
    }

    fn serialize_i32(self, value: i32) -> Result<(), EncodeError> {
        self.signed(value.into());
        Ok(())
    }

    fn serialize_i64(self, value: i64) -> Result<(), EncodeError> {
        self.signed(value);
        Ok(())
    }

    fn serialize_i128(self, value: i128) -> Result<(), EncodeError> {
        if let Ok(value) = i64::try_from(value) {
            self.signed(value);
        } else if value < 0 {
            self.leave_raw();
            self.bignum(TAG_NEGATIVE_BIGNUM, value.unsigned_abs() - 1);
        } else {
            self.leave_raw();
            self.bignum(TAG_POSITIVE_BIGNUM, value.unsigned_abs());
        }
        Ok(())
    }

    #[inline]
    fn serialize_u8(self, value: u8) -> Result<(), EncodeError> {
        if self.raw_from.is_some() {
            self.out.push(value);
        } else {
            self.head(UNSIGNED, value.into());
        }
        Ok(())
    }

    #[inline]
    fn serialize_u16(self, value: u16) -> Result<(), EncodeError> {
        self.unsigned(value.into());
        Ok(())
    }

    #[inline]
    fn serialize_u32(self, value: u32) -> Result<(), EncodeError> {
        self.unsigned(value.into());
        Ok(())
    }

    #[inline]
    fn serialize_u64(self, value: u64) -> Result<(), EncodeError> {
        self.unsigned(value);
        Ok(())
    }

    fn serialize_u128(self, value: u128) -> Result<(), EncodeError> {
        if let Ok(value) = u64::try_from(value) {
            self.unsigned(value);
        } else {
            self.leave_raw();
            self.bignum(TAG_POSITIVE_BIGNUM, value);
        }
        Ok(())
    }

    fn serialize_f32(self, value: f32) -> Result<(), EncodeError> {
        self.leave_raw();
        self.out.push(FLOAT32);
        self.out.extend_from_slice(&value.to_be_bytes());
        Ok(())
    }

    fn serialize_f64(self, value: f64) -> Result<(), EncodeError> {
        self.leave_raw();
        self.out.push(FLOAT64);
        self.out.extend_from_slice(&value.to_be_bytes());
        Ok(())
    }

    fn serialize_char(self, value: char) -> Result<(), EncodeError> {
        let mut buffer = [0u8; 4];
        self.serialize_str(value.encode_utf8(&mut buffer))
    }

    fn serialize_str(self, value: &str) -> Result<(), EncodeError> {
        self.leave_raw();
        self.text(value);
        Ok(())
    }

    #[inline]
    fn serialize_bytes(self, value: &[u8]) -> Result<(), EncodeError> {
        self.leave_raw();
        self.byte_string(value);
        Ok(())
    }

    #[inline]
    fn serialize_none(self) -> Result<(), EncodeError> {
        self.leave_raw();
        self.out.push(NULL);
        Ok(())
    }

    fn serialize_some<T: ?Sized + Serialize>(self, value: &T) -> Result<(), EncodeError> {
        // An `Option<u8>` element is not a byte: ciborium would read it back through
        // `deserialize_option`, which a byte of a byte string cannot answer.
        self.leave_raw();
        value.serialize(self)
    }

    fn serialize_unit(self) -> Result<(), EncodeError> {
        self.serialize_none()
    }

    fn serialize_unit_struct(self, _name: &'static str) -> Result<(), EncodeError> {
        self.serialize_none()
    }

    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<(), EncodeError> {
        self.serialize_str(variant)
    }

    fn serialize_newtype_struct<T: ?Sized + Serialize>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<(), EncodeError> {
        // Same reason as `serialize_some`: a newtype's visitor does not accept a bare `u8`.
        self.leave_raw();
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: ?Sized + Serialize>(
        self,
        name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), EncodeError> {
        self.leave_raw();
        if name != TAG_ENUM || variant != UNTAGGED_VARIANT {
            self.head(MAP, 1);
            self.text(variant);
        }
        value.serialize(self)
    }

    fn serialize_seq(self, length: Option<usize>) -> Result<Collection<'a>, EncodeError> {
        self.leave_raw();
        Ok(self.open(ARRAY, length, true))
    }

    fn serialize_tuple(self, length: usize) -> Result<Collection<'a>, EncodeError> {
        // `[u8; N]` arrives here; ciborium reads a tuple through `deserialize_seq`.
        self.serialize_seq(Some(length))
    }

    fn serialize_tuple_struct(
        self,
        _name: &'static str,
        length: usize,
    ) -> Result<Collection<'a>, EncodeError> {
        // ciborium reads a tuple struct through `deserialize_seq` too.
        self.serialize_seq(Some(length))
    }

    fn serialize_tuple_variant(
        self,
        name: &'static str,
        _index: u32,
        variant: &'static str,
        length: usize,
    ) -> Result<Collection<'a>, EncodeError> {
        self.leave_raw();
        if name == TAG_ENUM && variant == TAGGED_VARIANT {
            let mut tagged = self.open(ARRAY, None, false);
            tagged.tag = TagState::ExpectNumber;
            return Ok(tagged);
        }
        self.head(MAP, 1);
        self.text(variant);
        // Never a byte string: ciborium reads a variant's fields with `deserialize_any`.
        Ok(self.open(ARRAY, Some(length), false))
    }

    fn serialize_map(self, length: Option<usize>) -> Result<Collection<'a>, EncodeError> {
        self.leave_raw();
        Ok(self.open(MAP, length, false))
    }

    fn serialize_struct(
        self,
        _name: &'static str,
        length: usize,
    ) -> Result<Collection<'a>, EncodeError> {
        self.serialize_map(Some(length))
    }

    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        length: usize,
    ) -> Result<Collection<'a>, EncodeError> {
        self.leave_raw();
        self.head(MAP, 1);
        self.text(variant);
        Ok(self.open(MAP, Some(length), false))
    }

    fn is_human_readable(&self) -> bool {
        false
    }
}

impl ser::SerializeSeq for Collection<'_> {
    type Ok = ();
    type Error = EncodeError;

    fn serialize_element<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<(), EncodeError> {
        self.element(value)
    }

    fn end(self) -> Result<(), EncodeError> {
        self.finish()
    }
}

impl ser::SerializeTuple for Collection<'_> {
    type Ok = ();
    type Error = EncodeError;

    fn serialize_element<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<(), EncodeError> {
        self.element(value)
    }

    fn end(self) -> Result<(), EncodeError> {
        self.finish()
    }
}

impl ser::SerializeTupleStruct for Collection<'_> {
    type Ok = ();
    type Error = EncodeError;

    fn serialize_field<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<(), EncodeError> {
        self.element(value)
    }

    fn end(self) -> Result<(), EncodeError> {
        self.finish()
    }
}

impl ser::SerializeTupleVariant for Collection<'_> {
    type Ok = ();
    type Error = EncodeError;

    fn serialize_field<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<(), EncodeError> {
        if self.tag == TagState::NotATag {
            self.element(value)
        } else {
            self.tag_part(value)
        }
    }

    fn end(self) -> Result<(), EncodeError> {
        self.finish()
    }
}

impl ser::SerializeMap for Collection<'_> {
    type Ok = ();
    type Error = EncodeError;

    fn serialize_key<T: ?Sized + Serialize>(&mut self, key: &T) -> Result<(), EncodeError> {
        self.entry_part(key)
    }

    fn serialize_value<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<(), EncodeError> {
        self.entry_part(value)?;
        self.count += 1;
        Ok(())
    }

    fn end(self) -> Result<(), EncodeError> {
        self.finish()
    }
}

impl ser::SerializeStruct for Collection<'_> {
    type Ok = ();
    type Error = EncodeError;

    fn serialize_field<T: ?Sized + Serialize>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), EncodeError> {
        self.field(key, value)
    }

    fn end(self) -> Result<(), EncodeError> {
        self.finish()
    }
}

impl ser::SerializeStructVariant for Collection<'_> {
    type Ok = ();
    type Error = EncodeError;

    fn serialize_field<T: ?Sized + Serialize>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), EncodeError> {
        self.field(key, value)
    }

    fn end(self) -> Result<(), EncodeError> {
        self.finish()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};
    use std::fmt::Debug;

    use serde::de::DeserializeOwned;
    use serde::{Deserialize, Serialize, Serializer};

    use super::{recode_key, to_vec};

    fn old_form<T: Serialize>(value: &T) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(value, &mut out).expect("ciborium encodes");
        out
    }

    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> T {
        ciborium::from_reader(bytes).expect("ciborium decodes")
    }

    /// Encodes with the new encoder, decodes both that and the old form, and returns the new
    /// encoding for further checks.
    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(value: &T) -> Vec<u8> {
        let new = to_vec(value).expect("encodes");
        assert_eq!(&decode::<T>(&new), value, "new form of {value:?}");
        assert_eq!(
            &decode::<T>(&old_form(value)),
            value,
            "old form of {value:?}"
        );
        new
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Secrets {
        key: Vec<u8>,
        empty: Vec<u8>,
        nested: Vec<Vec<u8>>,
        maybe: Option<Vec<u8>>,
        missing: Option<Vec<u8>>,
        fixed: [u8; 32],
        small: [u8; 3],
        none_fixed: [u8; 0],
        pair: (u8, u8),
        mixed: (u8, u16, String),
        options: Vec<Option<u8>>,
        wide: Vec<u16>,
        signed: Vec<i8>,
        newtypes: Vec<Byte>,
        tuple_struct: Pair,
        by_key: BTreeMap<Vec<u8>, Vec<u8>>,
        by_name: HashMap<String, u8>,
        kinds: Vec<Kind>,
        long: Vec<u8>,
        longer: Vec<u8>,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Byte(u8);

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Pair(u8, u8);

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    enum Kind {
        Unit,
        Newtype(Vec<u8>),
        Small(u8),
        Tuple(u8, u8),
        Mixed(Vec<u8>, u32),
        Struct { bytes: Vec<u8>, index: u32 },
    }

    fn secrets() -> Secrets {
        Secrets {
            key: (0..=255).collect(),
            empty: Vec::new(),
            nested: vec![vec![1, 2, 3], Vec::new(), vec![200; 40]],
            maybe: Some(vec![9; 24]),
            missing: None,
            fixed: [0xab; 32],
            small: [1, 24, 255],
            none_fixed: [],
            pair: (23, 24),
            mixed: (7, 300, "x".into()),
            options: vec![Some(1), None, Some(255)],
            wide: vec![1, 2, 3],
            signed: vec![-1, 0, 1],
            newtypes: vec![Byte(1), Byte(200)],
            tuple_struct: Pair(3, 250),
            by_key: BTreeMap::from([(vec![1, 2], vec![3, 4]), (Vec::new(), vec![5])]),
            by_name: HashMap::from([("a".to_string(), 1), ("b".to_string(), 255)]),
            kinds: vec![
                Kind::Unit,
                Kind::Newtype(vec![1, 2, 3]),
                Kind::Small(4),
                Kind::Tuple(5, 6),
                Kind::Mixed(vec![7, 8], 9),
                Kind::Struct {
                    bytes: vec![10; 300],
                    index: 11,
                },
            ],
            long: vec![0x5a; 70_000],
            longer: (0..100_000u32).map(|index| index as u8).collect(),
        }
    }

    #[test]
    fn representative_types_round_trip_in_both_forms() {
        let value = secrets();
        let new = round_trip(&value);
        let old = old_form(&value);
        // The byte vectors dominate: the new form is about half the old one.
        assert!(
            new.len() * 10 < old.len() * 6,
            "{} vs {}",
            new.len(),
            old.len()
        );
        assert!(new.len() < 175_000, "{}", new.len());
    }

    #[test]
    fn a_byte_vector_is_a_byte_string_and_an_empty_one_an_empty_array() {
        assert_eq!(
            to_vec(&vec![1u8, 2, 255]).expect("encodes"),
            [0x43, 1, 2, 255]
        );
        assert_eq!(to_vec(&Vec::<u8>::new()).expect("encodes"), [0x80]);
        assert_eq!(to_vec(&[7u8; 2]).expect("encodes"), [0x42, 7, 7]);
        let head_of_300 = [0x59, 0x01, 0x2c];
        assert_eq!(to_vec(&vec![0u8; 300]).expect("encodes")[..3], head_of_300);
        // Not bytes: wider integers, options and newtypes of u8, a variant's fields.
        assert_eq!(to_vec(&vec![1u16, 2]).expect("encodes"), [0x82, 1, 2]);
        assert_eq!(to_vec(&vec![Some(1u8)]).expect("encodes"), [0x81, 1]);
        assert_eq!(to_vec(&vec![Byte(30)]).expect("encodes"), [0x81, 0x18, 30]);
        assert_eq!(
            to_vec(&Kind::Tuple(1, 2)).expect("encodes"),
            old_form(&Kind::Tuple(1, 2))
        );
    }

    #[test]
    fn a_run_of_bytes_followed_by_another_value_becomes_an_array_again() {
        let value = (1u8, 200u8, "tail".to_string());
        let new = to_vec(&value).expect("encodes");
        assert_eq!(new, old_form(&value));
        let value = (5u8, 30u8, vec![1u8, 2], 7u8);
        let new = to_vec(&value).expect("encodes");
        assert_eq!(new, [0x84, 5, 0x18, 30, 0x42, 1, 2, 7]);
        assert_eq!(decode::<(u8, u8, Vec<u8>, u8)>(&new), value);
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Plain {
        count: u64,
        negative: i64,
        huge: u128,
        very_negative: i128,
        name: String,
        letter: char,
        flag: bool,
        nothing: (),
        kind: Kind,
        maybe: Option<u32>,
        list: Vec<u32>,
        map: BTreeMap<u32, String>,
    }

    #[test]
    fn values_without_byte_sequences_are_written_exactly_as_ciborium_writes_them() {
        let value = Plain {
            count: u64::MAX,
            negative: i64::MIN,
            huge: u128::MAX - 5,
            very_negative: i128::MIN + 3,
            name: "ünïcode".into(),
            letter: 'ß',
            flag: true,
            nothing: (),
            kind: Kind::Struct {
                bytes: Vec::new(),
                index: 70_000,
            },
            maybe: Some(65_536),
            list: vec![0, 23, 24, 255, 256, 65_535, 65_536, u32::MAX],
            map: BTreeMap::from([(1, "one".into()), (1000, "thousand".into())]),
        };
        assert_eq!(to_vec(&value).expect("encodes"), old_form(&value));
        assert_eq!(decode::<Plain>(&to_vec(&value).expect("encodes")), value);
    }

    /// Serializes with unknown lengths (`collect_seq` of a filter has no exact size hint).
    struct Unsized(Vec<u8>, Vec<u32>);

    impl Serialize for Unsized {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            use serde::ser::SerializeTuple;
            struct Bytes<'a>(&'a [u8]);
            impl Serialize for Bytes<'_> {
                fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                    serializer.collect_seq(self.0.iter().filter(|_| true))
                }
            }
            struct Words<'a>(&'a [u32]);
            impl Serialize for Words<'_> {
                fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                    serializer.collect_map(self.0.iter().filter(|_| true).map(|word| (word, word)))
                }
            }
            let mut tuple = serializer.serialize_tuple(2)?;
            tuple.serialize_element(&Bytes(&self.0))?;
            tuple.serialize_element(&Words(&self.1))?;
            tuple.end()
        }
    }

    #[test]
    fn sequences_and_maps_of_unknown_length_get_a_definite_head() {
        let new = to_vec(&Unsized(vec![1, 2, 3], vec![4, 5])).expect("encodes");
        assert_eq!(new, [0x82, 0x43, 1, 2, 3, 0xa2, 4, 4, 5, 5]);
        let empty = to_vec(&Unsized(Vec::new(), Vec::new())).expect("encodes");
        assert_eq!(empty, [0x82, 0x80, 0xa0]);
    }

    /// Announces three elements and writes two.
    struct Miscounted;

    impl Serialize for Miscounted {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            use serde::ser::SerializeSeq;
            let mut seq = serializer.serialize_seq(Some(3))?;
            seq.serialize_element(&1u8)?;
            seq.serialize_element(&2u8)?;
            seq.end()
        }
    }

    #[test]
    fn a_miscounted_sequence_still_encodes_its_real_length() {
        let new = to_vec(&Miscounted).expect("encodes");
        assert_eq!(new, [0x42, 1, 2]);
    }

    #[test]
    fn ciborium_values_keep_their_tags() {
        use ciborium::Value;
        let value = Value::Array(vec![
            Value::Tag(42, Box::new(Value::Bytes(vec![1, 2]))),
            Value::Tag(1000, Box::new(Value::Text("t".into()))),
            Value::Integer(5.into()),
        ]);
        let new = to_vec(&value).expect("encodes");
        assert_eq!(new, old_form(&value));
        assert_eq!(decode::<Value>(&new), value);
    }

    /// The keys openmls_sqlite_storage looks rows up by: re-encoding their old form must give
    /// exactly what the new codec writes for the typed key, and be idempotent.
    #[test]
    fn recoded_storage_keys_match_the_new_encoding_of_each_key_type() {
        use openmls::prelude::{GroupEpoch, GroupId, KeyPackageRef};
        use openmls::schedule::psk::{ResumptionPsk, ResumptionPskUsage};
        use openmls::schedule::{ExternalPsk, Psk};
        use openmls::treesync::EncryptionKey;
        use openmls_basic_credential::StorageId;

        fn check<T: Serialize>(key: &T) {
            let old = old_form(key);
            let new = to_vec(key).expect("encodes");
            assert_ne!(old, new, "the test keys all hold bytes");
            assert_eq!(recode_key(&old).as_deref(), Some(&new[..]));
            assert_eq!(recode_key(&new).as_deref(), Some(&new[..]));
        }

        let bytes: Vec<u8> = (0..32).map(|index| index * 7).collect();
        check(&GroupId::from_slice(&bytes));
        let crypto = openmls_rust_crypto::RustCrypto::default();
        check(
            &KeyPackageRef::new(
                &bytes,
                crate::core::CIPHERSUITE,
                &crypto,
                b"MLS 1.0 Proposal Reference",
            )
            .expect("hash reference"),
        );
        check(&EncryptionKey::from(bytes.clone()));
        check(&StorageId::from(bytes.clone()));
        check(&Psk::External(ExternalPsk::new(bytes.clone())));
        check(&Psk::Resumption(ResumptionPsk::new(
            ResumptionPskUsage::Application,
            GroupId::from_slice(&bytes),
            GroupEpoch::from(300),
        )));
        let epoch = GroupEpoch::from(70_000);
        assert_eq!(
            recode_key(&old_form(&epoch)),
            Some(to_vec(&epoch).expect("encodes"))
        );
        assert_eq!(recode_key(b"\xff\x00"), None);
    }
}
