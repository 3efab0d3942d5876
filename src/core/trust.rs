//! What people compare to trust each other: member fingerprints (from signature keys) and the
//! per-epoch group verification code (from the epoch authenticator, RFC 9420 §8.7).

use sha2::{Digest, Sha256};

/// A fingerprint of a signature public key: 12 groups of 5 digits, easy to read aloud.
///
/// Each group is 5 bytes of SHA-256("mlschat fingerprint" || key) reduced mod 100000, so both
/// sides compute the same digits from the same key.
pub fn fingerprint(signature_key: &[u8]) -> String {
    let digest = Sha256::new()
        .chain_update(b"mlschat fingerprint\0")
        .chain_update(signature_key)
        .finalize();
    let mut expanded = digest.to_vec();
    expanded.extend_from_slice(&Sha256::digest(digest));
    expanded
        .chunks(5)
        .take(12)
        .map(|chunk| {
            let value = chunk
                .iter()
                .fold(0u64, |acc, byte| (acc << 8) | u64::from(*byte));
            format!("{:05}", value % 100_000)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The group's short verification code for one epoch: two groups of three digits. Members
/// who see the same code share the same epoch authenticator, so the DS has not split them.
pub fn verification_code(epoch_authenticator: &[u8]) -> String {
    let digest = Sha256::new()
        .chain_update(b"mlschat verification code\0")
        .chain_update(epoch_authenticator)
        .finalize();
    let value = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) % 1_000_000;
    format!("{:03} {:03}", value / 1000, value % 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_shape_and_determinism() {
        let print = fingerprint(&[7u8; 32]);
        assert_eq!(print.split(' ').count(), 12);
        assert!(
            print
                .split(' ')
                .all(|group| group.len() == 5 && group.bytes().all(|b| b.is_ascii_digit()))
        );
        assert_eq!(print, fingerprint(&[7u8; 32]));
        assert_ne!(print, fingerprint(&[8u8; 32]));
    }

    #[test]
    fn verification_code_shape() {
        let code = verification_code(b"authenticator");
        assert_eq!(code.len(), 7);
        assert_ne!(code, verification_code(b"another authenticator"));
    }
}
