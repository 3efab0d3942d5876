//! Run-length packing of the CBOR nulls in stored openmls values, so that a large group's
//! secret tree, rewritten on every message, costs SQLite a page instead of seventeen.
//!
//! openmls keeps a dense secret tree: four vectors with one slot per leaf or node of the tree,
//! almost all `None` (a member holds ratchets only for the senders it has heard from). In CBOR
//! each `None` is one null byte (0xf6), so at 10,000 members the tree is about 67 KB, nearly all
//! of it long runs of 0xf6, and openmls writes it in the transaction of every message sent or
//! received. Packed, it is about 1 KB.
//!
//! A packed value starts with 0xff, which never starts a CBOR data item (it is the "break" stop
//! code, RFC 8949 §3.2.1), so values stored before packing, and values too small to pack, are
//! read as they are. After the marker: the unpacked length, then segments of (literal length,
//! literal bytes, length of the null run that follows), all lengths as LEB128 varints.

use std::borrow::Cow;

/// The first byte of a packed value.
const PACKED: u8 = 0xff;
/// CBOR's null (RFC 8949 §3.3), which is how serde's `None` is encoded.
const NULL: u8 = 0xf6;
/// Shorter runs stay literal: a run costs up to three varint bytes.
const MIN_RUN: usize = 16;
/// Values shorter than this are stored as they are (storage keys among them, which must keep
/// one encoding so that openmls_sqlite_storage finds rows by comparing blobs).
const MIN_PACKED_INPUT: usize = 1024;
/// Refuses to unpack more than this: a corrupt length must not allocate without bound.
const MAX_UNPACKED: u64 = 1 << 30;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UnpackError {
    #[error("packed value ends inside a length or a literal")]
    Truncated,
    #[error("packed value claims {0} bytes, more than any stored value")]
    TooLarge(u64),
    #[error("packed value unpacks to {actual} bytes, not the {announced} it announced")]
    LengthMismatch { announced: u64, actual: u64 },
}

/// Packs `encoded` if it is large and holds at least one long run of nulls; otherwise returns
/// it unchanged.
pub fn pack(encoded: Vec<u8>) -> Vec<u8> {
    if encoded.len() < MIN_PACKED_INPUT {
        return encoded;
    }
    let Some(first_run) = find_run(&encoded, 0) else {
        return encoded;
    };
    let mut packed = Vec::with_capacity(encoded.len() / 8 + 16);
    packed.push(PACKED);
    write_varint(&mut packed, encoded.len() as u64);
    let mut literal_from = 0;
    let mut next = Some(first_run);
    while let Some((run_start, run_end)) = next {
        write_varint(&mut packed, (run_start - literal_from) as u64);
        packed.extend_from_slice(&encoded[literal_from..run_start]);
        write_varint(&mut packed, (run_end - run_start) as u64);
        literal_from = run_end;
        next = find_run(&encoded, run_end);
    }
    if literal_from < encoded.len() {
        write_varint(&mut packed, (encoded.len() - literal_from) as u64);
        packed.extend_from_slice(&encoded[literal_from..]);
        write_varint(&mut packed, 0);
    }
    packed
}

/// The CBOR bytes of a stored value: borrowed if it was stored unpacked.
pub fn unpack(stored: &[u8]) -> Result<Cow<'_, [u8]>, UnpackError> {
    let Some((&PACKED, mut rest)) = stored.split_first() else {
        return Ok(Cow::Borrowed(stored));
    };
    let announced = read_varint(&mut rest)?;
    if announced > MAX_UNPACKED {
        return Err(UnpackError::TooLarge(announced));
    }
    let mut unpacked = Vec::with_capacity(announced as usize);
    while !rest.is_empty() {
        let literal =
            usize::try_from(read_varint(&mut rest)?).map_err(|_| UnpackError::Truncated)?;
        let (bytes, after) = rest
            .split_at_checked(literal)
            .ok_or(UnpackError::Truncated)?;
        rest = after;
        let run = read_varint(&mut rest)?;
        let actual = unpacked.len() as u64 + literal as u64 + run;
        if actual > announced {
            return Err(UnpackError::LengthMismatch { announced, actual });
        }
        unpacked.extend_from_slice(bytes);
        unpacked.resize(actual as usize, NULL);
    }
    let actual = unpacked.len() as u64;
    if actual != announced {
        return Err(UnpackError::LengthMismatch { announced, actual });
    }
    Ok(Cow::Owned(unpacked))
}

/// The next run of at least [`MIN_RUN`] nulls at or after `from`, as (start, end).
fn find_run(bytes: &[u8], mut from: usize) -> Option<(usize, usize)> {
    while let Some(offset) = memchr::memchr(NULL, &bytes[from..]) {
        let start = from + offset;
        let end = start + null_run_length(&bytes[start..]);
        if end - start >= MIN_RUN {
            return Some((start, end));
        }
        from = end;
    }
    None
}

/// How many nulls `bytes` starts with, compared eight at a time.
fn null_run_length(bytes: &[u8]) -> usize {
    const EIGHT_NULLS: u64 = u64::from_ne_bytes([NULL; 8]);
    let mut length = 0;
    for chunk in bytes.chunks_exact(8) {
        let word = u64::from_ne_bytes(chunk.try_into().unwrap_or_default());
        if word != EIGHT_NULLS {
            break;
        }
        length += 8;
    }
    length
        + bytes[length..]
            .iter()
            .take_while(|byte| **byte == NULL)
            .count()
}

fn write_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn read_varint(input: &mut &[u8]) -> Result<u64, UnpackError> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = input.split_first().ok_or(UnpackError::Truncated)?;
        *input = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(UnpackError::Truncated)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(input: &[u8]) -> Vec<u8> {
        let packed = pack(input.to_vec());
        let unpacked = unpack(&packed).expect("unpacks").into_owned();
        assert_eq!(unpacked, input);
        packed
    }

    #[test]
    fn long_null_runs_shrink_and_come_back_exactly() {
        let mut input = vec![0x84, 0x01];
        input.extend(std::iter::repeat_n(NULL, 60_000));
        input.extend_from_slice(&[0x58, 0x20]);
        input.extend(0..32u8);
        input.extend(std::iter::repeat_n(NULL, 5_000));
        let packed = round_trip(&input);
        assert_eq!(packed[0], PACKED);
        assert!(packed.len() < 64, "{} bytes", packed.len());
    }

    #[test]
    fn runs_at_the_edges_short_runs_and_odd_lengths_round_trip() {
        let mut input: Vec<u8> = std::iter::repeat_n(NULL, 37).collect();
        for length in 1..40 {
            input.extend(std::iter::repeat_n(NULL, length));
            input.push(length as u8);
        }
        input.extend(std::iter::repeat_n(NULL, 1_000));
        let packed = round_trip(&input);
        assert_eq!(packed[0], PACKED);
        assert!(packed.len() < input.len() / 2);
    }

    #[test]
    fn small_values_and_values_without_runs_are_stored_as_they_are() {
        let small: Vec<u8> = std::iter::repeat_n(NULL, 1_000).collect();
        assert_eq!(round_trip(&small), small);
        let no_runs: Vec<u8> = (0..5_000u32).map(|index| (index % 200) as u8).collect();
        assert_eq!(round_trip(&no_runs), no_runs);
        assert!(matches!(unpack(&no_runs), Ok(Cow::Borrowed(_))));
        assert!(matches!(unpack(&[]), Ok(Cow::Borrowed(_))));
    }

    #[test]
    fn corrupt_packed_values_are_errors_not_panics() {
        let mut input = vec![1, 2, 3];
        input.extend(std::iter::repeat_n(NULL, 2_000));
        input.extend_from_slice(&[4, 5, 6]);
        let packed = pack(input);
        for cut in 1..packed.len() {
            assert!(unpack(&packed[..cut]).is_err(), "cut at {cut}");
        }
        assert_eq!(unpack(&[PACKED]), Err(UnpackError::Truncated));
        assert_eq!(
            unpack(&[PACKED, 0xff, 0xff, 0xff, 0xff, 0x7f]),
            Err(UnpackError::TooLarge((1 << 35) - 1))
        );
        assert!(matches!(
            unpack(&[PACKED, 10, 1, 7, 0xff, 0x7f]),
            Err(UnpackError::LengthMismatch { announced: 10, .. })
        ));
        assert_eq!(unpack(&[PACKED, 0x80, 0x80]), Err(UnpackError::Truncated));
    }
}
