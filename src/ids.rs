//! Identifiers for objects this operator names: time-sortable, unguessable, DNS-1123 safe.

use jiff::Timestamp;
use rand::TryRngCore;

/// Characters of an id.
pub const ID_LENGTH: usize = 26;
/// Lowercase Crockford base32; ASCII order equals digit order, so ids sort like their values.
const CROCKFORD: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";

/// A lowercase ULID: 48-bit millisecond time then 80 random bits from the OS CSPRNG.
pub fn time_sortable_id(now: Timestamp) -> String {
    let mut random = [0u8; 10];
    rand::rngs::OsRng
        .try_fill_bytes(&mut random)
        .expect("the OS random number generator works");
    id_at(now, random)
}

/// The id for a given time and randomness (deterministic, for tests).
pub fn id_at(now: Timestamp, random: [u8; 10]) -> String {
    let millis = now.as_millisecond().clamp(0, (1 << 48) - 1) as u128;
    let mut bytes = [0u8; 16];
    bytes[6..].copy_from_slice(&random);
    from_bits((millis << 80) | u128::from_be_bytes(bytes))
}

/// The id of the low 128 bits of `value` (the 26 characters hold 130 bits: the first character
/// is at most `7`), for ids derived rather than drawn.
pub fn from_bits(value: u128) -> String {
    (0..ID_LENGTH)
        .rev()
        .map(|i| char::from(CROCKFORD[((value >> (5 * i)) & 31) as usize]))
        .collect()
}

/// Whether `id` has the shape of an id from [`time_sortable_id`].
pub fn is_valid_id(id: &str) -> bool {
    id.len() == ID_LENGTH && id.bytes().all(|b| CROCKFORD.contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_sort_by_time_and_are_dns_safe() {
        let a = time_sortable_id(Timestamp::from_second(1_700_000_000).unwrap());
        let b = time_sortable_id(Timestamp::from_second(1_700_000_001).unwrap());
        assert!(a < b);
        assert!(is_valid_id(&a));
        assert!(a.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()));
        assert_ne!(
            time_sortable_id(Timestamp::UNIX_EPOCH),
            time_sortable_id(Timestamp::UNIX_EPOCH)
        );
        // All-zero randomness encodes the time alone: 1 ms is bit 80, the 10th character.
        let one_ms = Timestamp::from_millisecond(1).unwrap();
        assert_eq!(id_at(one_ms, [0; 10]), format!("{}1{}", "0".repeat(9), "0".repeat(16)));
    }
}
